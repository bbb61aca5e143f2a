// The BLAS fast path of the CPU backend against its plain loops, on odd sizes.
import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { coreTypeFromCpuFlags, loadBlas, OPENBLAS_FALLBACK_CORES } from "../lib/backend/blas.ts";
import { f32Tensor } from "../lib/io/safetensors.ts";
import { checkAttentionAgainst, maxRelError, randn } from "./util.ts";

const reference = new CpuBackend({ reference: true });
const fast = new CpuBackend();

Deno.test("BLAS is found (CI installs libopenblas0)", () => {
  if (Deno.env.get("CI") === "true") {
    assert(loadBlas(), "no BLAS library found; .ci/run installs libopenblas0-pthread");
  }
});

Deno.test("OpenBLAS runs kernels for the CPU's instruction set, not its SSE fallback", () => {
  const blas = loadBlas();
  // Not OpenBLAS, a CPU without AVX2, or a user who asked for the fallback: nothing to check.
  const forced = OPENBLAS_FALLBACK_CORES.includes(Deno.env.get("OPENBLAS_CORETYPE") ?? "");
  if (!blas?.kernels || !coreTypeFromCpuFlags() || forced) return;
  assert(
    !OPENBLAS_FALLBACK_CORES.includes(blas.kernels),
    `OpenBLAS chose ${blas.kernels} kernels on a CPU with ${coreTypeFromCpuFlags()}'s instructions`,
  );
  assert.match(fast.description, new RegExp(`\\(${blas.kernels} kernels\\)`));
});

Deno.test("cpu matmul: BLAS equals plain loops on odd sizes, with bias", async () => {
  // Up to 8 rows run as one sgemv per row (GEMV_MAX_ROWS in blas.ts), 9 and more as sgemm.
  for (
    const [n, k, m] of [[1, 5, 3], [1, 256, 77], [7, 63, 65], [8, 40, 9], [9, 40, 9], [33, 129, 17]]
  ) {
    const x = randn(n * k, 1), wt = randn(m * k, 2), b = randn(m, 3);
    const outs = await Promise.all([reference, fast].map((be) => {
      const y = be.matmul(
        be.tensor(x, [n, k]),
        be.uploadWeight(f32Tensor("w", [m, k], wt)),
        be.uploadWeight(f32Tensor("b", [m], b)),
      );
      return be.read(y);
    }));
    assert(
      maxRelError(outs[1], outs[0]) < 1e-5,
      `matmul ${n}x${k}x${m}: ${maxRelError(outs[1], outs[0])}`,
    );
  }
});

Deno.test("cpu attention over a KV cache in place (kvStride) equals it over the copied rows", async () => {
  // 2 sequences, 3 new queries over 10 keys, in a cache of 16 rows a sequence whose
  // unused rows hold random values (they must not be read).
  const s = { batch: 2, qLen: 3, kvLen: 10, heads: 4, kvHeads: 2, headDim: 8, window: 6 };
  const kw = s.kvHeads * s.headDim, stride = 16;
  const q = randn(s.batch * s.qLen * s.heads * s.headDim, 7);
  const kCache = randn(s.batch * stride * kw, 8), vCache = randn(s.batch * stride * kw, 9);
  const rows = (cache: Float32Array) =>
    Float32Array.from(
      [0, 1].flatMap((b) => [...cache.subarray(b * stride * kw, (b * stride + s.kvLen) * kw)]),
    );
  for (const be of [reference, fast]) {
    const qt = be.tensor(q, [s.batch * s.qLen, s.heads * s.headDim]);
    const inPlace = await be.read(be.attention(
      qt,
      be.tensor(kCache, [s.batch * stride, kw]),
      be.tensor(vCache, [s.batch * stride, kw]),
      { ...s, kvStride: stride },
    ));
    const copied = await be.read(be.attention(
      qt,
      be.tensor(rows(kCache), [s.batch * s.kvLen, kw]),
      be.tensor(rows(vCache), [s.batch * s.kvLen, kw]),
      s,
    ));
    assert.deepEqual(inPlace, copied);
    // A cache shorter than kvLen, or k and v of the wrong size, are errors.
    const k = be.tensor(kCache, [s.batch * stride, kw]);
    assert.throws(() => be.attention(qt, k, k, { ...s, kvStride: 8 }), /kvLen 10 > kvStride 8/);
    assert.throws(() => be.attention(qt, k, k, s), /do not match 2 sequences of 3 queries/);
    assert.throws(
      () => be.attentionBackward(qt, k, k, qt, { ...s, kvStride: stride }),
      /kvLen rows a sequence, not a cache/,
    );
  }
});

Deno.test("cpu splitQkv is the column split of a fused projection, q and k then rotated", async () => {
  const n = 3, heads = 4, kvHeads = 2, hd = 6, d = (heads + 2 * kvHeads) * hd;
  const x = randn(n * d, 10), positions = Int32Array.of(0, 5, 900);
  const columns = (c0: number, width: number) =>
    Float32Array.from(
      { length: n * width },
      (_, i) => x[Math.floor(i / width) * d + c0 + i % width],
    );
  const q = columns(0, heads * hd), k = columns(heads * hd, kvHeads * hd);
  const v = columns((heads + kvHeads) * hd, kvHeads * hd);
  const split = reference.splitQkv(reference.tensor(x, [n, d]), heads, kvHeads, hd, {
    positions,
    theta: 500,
    linearFactor: 2,
  });
  const rope = (values: Float32Array, h: number) =>
    reference.read(reference.rope(reference.tensor(values, [n, h * hd]), positions, h, hd, 500, 2));
  assert.deepEqual(await reference.read(split.q), await rope(q, heads));
  assert.deepEqual(await reference.read(split.k), await rope(k, kvHeads));
  assert.deepEqual(await reference.read(split.v), v);
  const plain = reference.splitQkv(reference.tensor(x, [n, d]), heads, kvHeads, hd, null);
  assert.deepEqual(await reference.read(plain.q), q);
});

Deno.test("cpu splitQkvIntoCache puts splitQkv's k and v in each sequence's cache rows", async () => {
  const batch = 2, seqLen = 3, capacity = 7, past = 2, heads = 2, kvHeads = 1, hd = 4;
  const n = batch * seqLen, d = (heads + 2 * kvHeads) * hd, kw = kvHeads * hd;
  const x = reference.tensor(randn(n * d, 3), [n, d]);
  const rope = { positions: Int32Array.of(2, 3, 4, 2, 3, 4), theta: 1e4, linearFactor: 1 };
  const split = reference.splitQkv(x, heads, kvHeads, hd, rope);
  const before = randn(batch * capacity * kw, 1);
  const cache = {
    k: reference.tensor(before.slice(), [batch * capacity, kw]),
    v: reference.tensor(before.slice(), [batch * capacity, kw]),
    seqLen,
    capacity,
    past,
  };
  const q = reference.splitQkvIntoCache(x, heads, kvHeads, hd, rope, cache);
  assert.deepEqual(await reference.read(q), await reference.read(split.q));
  for (const part of ["k", "v"] as const) {
    const want = before.slice(), values = await reference.read(split[part]);
    for (let r = 0; r < n; r++) {
      const row = Math.floor(r / seqLen) * capacity + past + r % seqLen;
      want.set(values.subarray(r * kw, (r + 1) * kw), row * kw); // written, not added
    }
    assert.deepEqual(await reference.read(cache[part]), want, part);
  }
  // Rows past the capacity, a ragged batch or a cache of another width are refused.
  assert.throws(
    () => reference.splitQkvIntoCache(x, heads, kvHeads, hd, rope, { ...cache, past: 5 }),
    /do not fit caches k \[14,4\], v \[14,4\] of capacity 7 and width 4/,
  );
  assert.throws(
    () => reference.splitQkvIntoCache(x, heads, kvHeads, hd, rope, { ...cache, seqLen: 4 }),
    /6 rows of 4 per sequence/,
  );
});

Deno.test("cpu attention: BLAS equals plain loops (GQA, qLen < kvLen, window, decode)", async () => {
  await checkAttentionAgainst(fast, reference, "attention");
});
