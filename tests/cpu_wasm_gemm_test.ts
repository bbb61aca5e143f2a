// The WebAssembly SIMD GEMM (the CPU backend's matmul without BLAS) against plain loops on odd
// sizes, every transpose, alpha and beta, strides, both builds (relaxed-SIMD FMA and multiply
// then add); bit-identical for any thread count; the backend's ops on it against the
// reference; the search choosing as with BLAS; and the line a job prints on start.
import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { RowThreads, sharedFloats } from "../lib/backend/cpu_rows.ts";
import { hasRelaxedSimd, wasmBlas } from "../lib/backend/wasm_gemm.ts";
import { f32Tensor } from "../lib/io/safetensors.ts";
import { DEFAULT_CALIBRATION } from "../lib/methods/calibration.ts";
import { runSearchJob, type SearchSettings } from "../lib/methods/search_job.ts";
import { compileGemm, GEMM_TS } from "../scripts/build_simd.ts";
import { DEFAULT_MODEL } from "./golden.ts";
import { assertIdentical, checkAttentionAgainst, maxRelError, randn } from "./util.ts";

Deno.test("wasm gemm: gemm_wasm.ts is gemm.wat compiled (deno task build-simd)", async () => {
  assert.equal(Deno.readTextFileSync(GEMM_TS), await compileGemm());
});

Deno.test("wasm gemm: Deno has relaxed SIMD (the FMA build runs)", () => {
  assert(hasRelaxedSimd(), "WebAssembly relaxed SIMD is missing: the plain build runs");
});

/** C = alpha op(A) op(B) + beta C in JS doubles, row-major with leading dimensions. */
function plainGemm(
  transA: boolean,
  transB: boolean,
  m: number,
  n: number,
  k: number,
  alpha: number,
  a: Float32Array,
  lda: number,
  b: Float32Array,
  ldb: number,
  beta: number,
  c: Float32Array,
  ldc: number,
): void {
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) {
        s += (transA ? a[p * lda + i] : a[i * lda + p]) *
          (transB ? b[j * ldb + p] : b[p * ldb + j]);
      }
      c[i * ldc + j] = alpha * s + (beta === 0 ? 0 : beta * c[i * ldc + j]);
    }
  }
}

// [m, n, k]: single entries, fewer rows than a tile (no packing below 5 rows), edges in every
// direction, k past a k block (256), and wide or tall enough to split by columns or by rows.
const SIZES = [
  [1, 1, 1],
  [7, 13, 5],
  [33, 65, 17],
  [2, 9, 300],
  [4, 1, 3],
  [5, 77, 64],
  [100, 37, 513],
  [13, 200, 70],
] as const;

for (const relaxed of [true, false]) {
  Deno.test(`wasm gemm (${relaxed ? "relaxed FMA" : "multiply-add"}) equals plain loops`, () => {
    if (relaxed && !hasRelaxedSimd()) return;
    const blas = wasmBlas(RowThreads.shared(1), relaxed);
    let seed = 1;
    for (const [m, n, k] of SIZES) {
      for (const transA of [false, true]) {
        for (const transB of [false, true]) {
          for (const [alpha, beta] of [[1, 0], [0.5, 1], [2, -0.25]]) {
            // Leading dimensions past the rows' lengths: the gaps must not be read or written.
            const lda = (transA ? m : k) + 3, ldb = (transB ? k : n) + 2, ldc = n + 5;
            const a = randn((transA ? k : m) * lda, seed++);
            const b = randn((transB ? n : k) * ldb, seed++);
            const want = randn(m * ldc, seed++), got = want.slice();
            plainGemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, want, ldc);
            blas.sgemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, got, ldc);
            const what = `${m}x${n}x${k} transA ${transA} transB ${transB} ${alpha}/${beta}`;
            assert(maxRelError(got, want) < 1e-5, `${what}: ${maxRelError(got, want)}`);
          }
        }
      }
    }
  });
}

Deno.test("wasm gemm: k = 0 scales C by beta, and m or n = 0 does nothing", () => {
  const blas = wasmBlas(RowThreads.shared(1));
  const c = Float32Array.of(1, 2, 3, 4);
  blas.sgemm(false, false, 2, 2, 0, 1, new Float32Array(), 0, new Float32Array(), 2, 0.5, c, 2);
  assert.deepEqual(c, Float32Array.of(0.5, 1, 1.5, 2));
  blas.sgemm(false, false, 0, 2, 3, 1, new Float32Array(), 3, new Float32Array(6), 2, 0, c, 2);
  assert.deepEqual(c, Float32Array.of(0.5, 1, 1.5, 2));
});

Deno.test("wasm gemm: split over threads, bit-identical to one thread", () => {
  const one = wasmBlas(RowThreads.shared(1)), three = wasmBlas(RowThreads.shared(3));
  // Above the split threshold (16M multiply-adds): by rows, by columns (wide), transposed,
  // a few rows (no packing); C in shared memory and not (then computed in a shared scratch).
  for (
    const [m, n, k, transA, transB] of [
      [601, 67, 515, false, true],
      [40, 1023, 501, false, false],
      [167, 131, 769, true, false],
      [7, 8000, 300, false, true],
      [3, 20011, 300, false, true],
      [2, 9001, 1000, false, false],
    ] as const
  ) {
    const a = randn(m * k, 1), b = randn(n * k, 2), c = randn(m * n, 3);
    const lda = transA ? m : k, ldb = transB ? k : n;
    for (const shared of [false, true]) {
      const outs = [one, three].map((blas) => {
        const out = shared ? sharedFloats(m * n) : new Float32Array(m * n);
        out.set(c);
        blas.sgemm(transA, transB, m, n, k, 1, a, lda, b, ldb, 1, out, n);
        return out;
      });
      assertIdentical([outs[1]], [outs[0]], `${m}x${n}x${k} shared C ${shared}`);
    }
  }
});

const reference = new CpuBackend({ reference: true });
const wasm = new CpuBackend({ wasmMatmul: true });

Deno.test("cpu backend on the wasm gemm: says so, and matmul with bias equals plain loops", async () => {
  assert.match(wasm.description, /matmul by WebAssembly SIMD \((relaxed FMA|multiply-add)/);
  for (
    const [n, k, m] of [[1, 5, 3], [1, 256, 77], [4, 63, 65], [5, 40, 9], [33, 129, 17]]
  ) {
    const x = randn(n * k, 1), wt = randn(m * k, 2), b = randn(m, 3);
    const outs = await Promise.all([reference, wasm].map((be) =>
      be.read(be.matmul(
        be.tensor(x, [n, k]),
        be.uploadWeight(f32Tensor("w", [m, k], wt)),
        be.uploadWeight(f32Tensor("b", [m], b)),
      ))
    ));
    assert(
      maxRelError(outs[1], outs[0]) < 1e-5,
      `${n}x${k}x${m}: ${maxRelError(outs[1], outs[0])}`,
    );
  }
});

Deno.test("cpu backend on the wasm gemm: attention equals plain loops (GQA, window, decode)", async () => {
  await checkAttentionAgainst(wasm, reference, "attention");
});

Deno.test("search job: the wasm gemm chooses the same experts and layers as BLAS", async () => {
  const settings: SearchSettings = {
    model: DEFAULT_MODEL.replace(/\/+$/, ""),
    data: DEFAULT_CALIBRATION,
    name: "tiny",
    docs: 4,
    maxLen: 32,
    profileMaxLen: 32, // one pass profiles and caches, as before the full-length profile
    profile: null,
    batchSize: 2,
    bos: "auto",
    metric: "js-hidden",
    expertMetric: "js-hidden",
    experts: null,
    layers: null,
    variants: ["sr", "blockdrop"],
    naive: false,
    layerwise: false,
  };
  // deno-lint-ignore no-explicit-any
  const results: any[] = [];
  for (const backend of [new CpuBackend(), wasm]) {
    const root = await Deno.makeTempDir();
    const opts = { resultsRoot: root, progress: false, log: () => {}, backend };
    results.push((await runSearchJob(settings, opts)).results);
    await Deno.remove(root, { recursive: true });
  }
  const [blas, ours] = results;
  for (const layer of Object.keys(blas.expert_search)) {
    assert.deepEqual(
      ours.expert_search[layer].order,
      blas.expert_search[layer].order,
      `layer ${layer}`,
    );
  }
  for (const variant of settings.variants) {
    const steps = (r: typeof blas) => r.layer_search[variant].steps;
    assert.deepEqual(ours.layer_search[variant].order, blas.layer_search[variant].order, variant);
    steps(ours).forEach((st: { divergence: number }, i: number) => {
      const want = steps(blas)[i].divergence;
      assert(Math.abs(st.divergence - want) <= 1e-5 * Math.max(1e-3, want), `${variant} ${i}`);
    });
  }
});

/** stderr of scripts/forward.ts on the default model's golden batch, with the given env. */
async function forwardStderr(env: Record<string, string>): Promise<string> {
  const script = new URL("../scripts/forward.ts", import.meta.url).pathname;
  const dir = await Deno.makeTempDir();
  const args = ["--model", DEFAULT_MODEL, "--input", `${DEFAULT_MODEL}/golden.safetensors`];
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args, "--out", `${dir}/logits.safetensors`],
    env,
    stdout: "null",
    stderr: "piped",
  }).output();
  await Deno.remove(dir, { recursive: true });
  const stderr = new TextDecoder().decode(out.stderr);
  assert(out.success, stderr);
  return stderr;
}

Deno.test("a job on the wasm gemm says so in one line, naming the package that is faster", async () => {
  // No library under the name given, as on a machine without OpenBLAS.
  const missing = await forwardStderr({ MOE_CONDENSE_BLAS: "libnot-installed.so.0" });
  assert.match(missing, /^matmul: no BLAS library found.*libopenblas0-pthread.*\n/);
  const forced = await forwardStderr({ MOE_CONDENSE_BLAS: "off" });
  assert.match(forced, /^matmul: WebAssembly SIMD, as MOE_CONDENSE_BLAS=off asks/);
});
