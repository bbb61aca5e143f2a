// deno task bench --only wasm-gemm: the WebAssembly SIMD GEMM (the CPU backend's matmul where
// OpenBLAS is missing) beside OpenBLAS, interleaved in one run: GFLOP/s at the bench's matmul
// shape and at the default model's shapes, on one thread and on the threads the backend uses.

import { loadBlas } from "../backend/blas.ts";
import { coreThreads, RowThreads, sharedFloats } from "../backend/cpu_rows.ts";
import { hasRelaxedSimd, loadGemm, wasmBlas } from "../backend/wasm_gemm.ts";
import { median } from "../eval/measure.ts";
import type { BenchSection } from "./common.ts";

// [n, k, m] of y[n, m] = x[n, k] w[m, k]^T (the backend's matmul): the matmul section's CPU
// shape, then the default model's search shapes (32 x 256 tokens: the dense gate-up
// projection, a routed expert's ~2,048 tokens, and attention's scores for one head) and a
// decode step.
const SHAPES = [
  [512, 1024, 1024],
  [8192, 256, 1536],
  [2048, 256, 256],
  [256, 64, 256],
  [1, 2048, 2048],
] as const;

function randomFloats(n: number, seed: number): Float32Array {
  const out = sharedFloats(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

/** Rows of the section's JSON: one a shape and implementation, with GFLOP/s. */
export function benchWasmGemm(repeats: number): Record<string, unknown>[] {
  if (!loadGemm()) {
    console.error("wasm-gemm: no WebAssembly SIMD here");
    return [];
  }
  const openblas = loadBlas();
  if (!openblas) console.error("wasm-gemm: no BLAS library (OpenBLAS) to compare with");
  const threads = coreThreads();
  const impls = [
    ...(openblas ? [{ name: `blas (${openblas.library})`, blas: openblas, threads: null }] : []),
    { name: "wasm", blas: wasmBlas(RowThreads.shared(1)), threads: 1 },
    ...(threads > 1 ? [{ name: "wasm", blas: wasmBlas(RowThreads.shared(threads)), threads }] : []),
  ];
  const rows: Record<string, unknown>[] = [];
  for (const [n, k, m] of SHAPES) {
    const x = randomFloats(n * k, 1), w = randomFloats(m * k, 2);
    const ys = impls.map(() => sharedFloats(n * m));
    const flops = 2 * n * k * m;
    // Enough calls a timing to last about 50 ms on a fast implementation.
    const calls = Math.max(1, Math.round(5e9 / flops));
    const times: number[][] = impls.map(() => []);
    for (const [i, impl] of impls.entries()) impl.blas.matmulTransB(x, w, ys[i], n, k, m); // warm-up
    for (let r = 0; r < repeats; r++) {
      for (const [i, impl] of impls.entries()) {
        const t0 = performance.now();
        for (let c = 0; c < calls; c++) impl.blas.matmulTransB(x, w, ys[i], n, k, m);
        times[i].push((performance.now() - t0) / 1000 / calls);
      }
    }
    const base = openblas ? median(times[0]) : null;
    for (const [i, impl] of impls.entries()) {
      const seconds = median(times[i]), gflops = flops / seconds / 1e9;
      // Agreement with the first implementation (OpenBLAS where present).
      let d = 0, scale = 0;
      for (let e = 0; e < n * m; e++) {
        d = Math.max(d, Math.abs(ys[i][e] - ys[0][e]));
        scale = Math.max(scale, Math.abs(ys[0][e]));
      }
      rows.push({
        implementation: impl.name,
        ...(impl.threads === null ? {} : { threads: impl.threads, relaxedSimd: hasRelaxedSimd() }),
        n,
        k,
        m,
        seconds,
        gflops,
        ...(base === null ? {} : { ofOpenblas: base / seconds }),
        maxRelDiff: scale === 0 ? d : d / scale,
      });
      console.error(
        `wasm-gemm ${n}x${k}x${m} ${impl.name}` +
          (impl.threads === null ? "" : ` ${impl.threads} thread(s)`) +
          `: ${gflops.toFixed(1)} GFLOP/s` +
          (base === null ? "" : ` (${((100 * base) / seconds).toFixed(0)}% of OpenBLAS)`),
      );
    }
  }
  return rows;
}

export const wasmGemmSection: BenchSection = {
  name: "wasm-gemm",
  run: (ctx) => Promise.resolve({ wasmGemm: benchWasmGemm(ctx.repeats) }),
};
