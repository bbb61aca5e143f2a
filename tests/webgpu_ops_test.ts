// Every WebGPU op against the CPU reference on fresh random inputs: sizes that are not
// multiples of the tiles, every weight dtype, and a backend with a tiny binding limit so
// weights and activations go through the chunked paths.

import assert from "node:assert";
import {
  argmaxRow,
  type AttentionShape,
  type Backend,
  idsOf,
  type Tensor,
  type Weight,
  type WeightDType,
} from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { NoWebGpuAdapterError } from "../lib/backend/webgpu/mod.ts";
import { f16ToF32 } from "../lib/io/safetensors.ts";
import {
  checkMatmulAgainstCpu,
  f32ToF16Bits,
  MATMUL_TOL,
  rawWeight,
  relError as sharedRelError,
  seededInputs,
  webgpuForTests,
} from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;
const cpu = new CpuBackend({ reference: true }); // the oracle: plain loops, no BLAS
// 4 KiB bindings: a [300, 64] bf16 table becomes 10 chunks, a [40, 64] activation 3,
// a [7, 300] one 3 (ranges start mid-row, bound from the 256-byte offset below).
const SMALL_BINDING = 4096;
const chunked = gpu?.withMaxBindingBytes(SMALL_BINDING);
/** The same sizes on the plain backend and on the chunked one. */
function backends<T>(sizes: T[]): [Backend, T[]][] {
  return [[gpu!, sizes], [chunked!, sizes]];
}

// Worst error seen per op, printed at the end for the report.
const maxErrors = new Map<string, number>();

const { randn, randInts, distinctRows } = seededInputs(0x9e3779b9);

const relError = (op: string, got: Float32Array, want: Float32Array) =>
  sharedRelError(maxErrors, op, got, want);

async function expectClose(op: string, got: Tensor, want: Tensor, tol: number) {
  assert.deepEqual([...got.shape], [...want.shape], `${op}: shape`);
  const err = relError(op, await gpu!.read(got), await cpu.read(want));
  assert(err <= tol, `${op}: relative error ${err} > ${tol}`);
}

/** The same f32 data as a tensor on both backends. */
function both(be: Backend, data: Float32Array, shape: number[]): [Tensor, Tensor] {
  return [be.tensor(data, shape), cpu.tensor(data, shape)];
}

const ELEMENTWISE_TOL = 1e-6;

const checkMatmul = (
  be: Backend,
  n: number,
  k: number,
  m: number,
  dtype: WeightDType,
  withBias: boolean,
) =>
  checkMatmulAgainstCpu(be, cpu, maxErrors, randn, `matmul ${dtype}`, [n, k, m], dtype, withBias);

const MATMUL_SIZES: [number, number, number][] = [
  [1, 5, 3],
  [7, 63, 65],
  [33, 129, 3],
  [33, 129, 65],
  [16, 16, 16],
  [1, 256, 300],
  [50, 17, 1],
];

for (const dtype of ["F32", "F16", "BF16"] as const) {
  Deno.test({
    name: `webgpu matmul ${dtype} matches cpu for ragged N, K, M, with and without bias`,
    ignore,
    async fn() {
      for (const [n, k, m] of MATMUL_SIZES) {
        await checkMatmul(gpu!, n, k, m, dtype, false);
        await checkMatmul(gpu!, n, k, m, dtype, true);
      }
    },
  });
}

Deno.test({
  name: "webgpu matmul with chunked weights and activations matches cpu",
  ignore,
  async fn() {
    const be = chunked!;
    // [33, 63] f16 at 126 B/row: chunks of 32 rows and 1 row (63 values, an odd count).
    await checkMatmul(be, 7, 63, 33, "F16", true);
    // [320, 64] bf16 at 128 B/row: 10 chunks of 32 rows; x [150, 64] and out [150, 320]
    // bound in row ranges.
    await checkMatmul(be, 150, 64, 320, "BF16", false);
    await checkMatmul(be, 70, 64, 20, "F32", true);
    // Ragged everything: [65, 129] bf16 (15 rows a chunk), x [33, 129], out [33, 65].
    await checkMatmul(be, 33, 129, 65, "BF16", true);
    // The weights really were split, and so were the activations: 10 weight chunks times
    // 50 row ranges of out [150, 320] (1280-byte rows, 3 to a 4 KiB binding).
    const w = be.uploadWeight(rawWeight("w", [33, 63], randn(33 * 63), "F16"));
    assert.equal((w as unknown as { chunks: unknown[] }).chunks.length, 2);
    be.freeWeight(w);
    const before = chunked!.dispatches;
    await checkMatmul(be, 150, 64, 320, "BF16", false);
    assert.equal(chunked!.dispatches - before, 10 * 50);
  },
});

Deno.test({
  name: "webgpu embedding matches cpu for every dtype, plain and chunked",
  ignore,
  async fn() {
    for (const be of [gpu!, chunked!]) {
      for (const dtype of ["F32", "F16", "BF16"] as const) {
        for (const [vocab, h] of [[300, 64], [11, 7]]) {
          const raw = rawWeight("embed", [vocab, h], randn(vocab * h), dtype);
          const ids = randInts(20, vocab);
          const gw = be.uploadWeight(raw);
          await expectClose(
            `embedding ${dtype}`,
            be.embedding(gw, ids),
            cpu.embedding(cpu.uploadWeight(raw), ids),
            0,
          );
          be.freeWeight(gw);
        }
      }
      const w = be.uploadWeight(rawWeight("embed", [4, 4], randn(16), "F32"));
      assert.throws(() => be.embedding(w, new Int32Array([4])), /out of range/);
      be.freeWeight(w);
    }
  },
});

Deno.test({
  name: "webgpu rmsNorm matches cpu for every weight dtype and odd widths",
  ignore,
  async fn() {
    for (const [be, sizes] of backends([[1, 5], [7, 300], [40, 64]])) {
      for (const dtype of ["F32", "F16", "BF16"] as const) {
        for (const [n, d] of sizes) {
          const raw = rawWeight("norm", [d], randn(d, 2), dtype);
          const [gx, cx] = both(be, randn(n * d, 3), [n, d]);
          await expectClose(
            `rmsNorm ${dtype}`,
            be.rmsNorm(gx, be.uploadWeight(raw), 1e-6),
            cpu.rmsNorm(cx, cpu.uploadWeight(raw), 1e-6),
            ELEMENTWISE_TOL * 4,
          );
        }
      }
    }
  },
});

Deno.test({
  name: "webgpu elementwise ops (add, swiglu, clamp, scale, sigmoidScaleRows) match cpu",
  ignore,
  async fn() {
    for (const [be, sizes] of backends([[1, 3], [33, 65], [40, 64]])) {
      for (const [n, d] of sizes) {
        // Wide range so silu/sigmoid see large negative and positive inputs.
        const [ga, ca] = both(be, randn(n * d, 30), [n, d]);
        const [gb, cb] = both(be, randn(n * d, 3), [n, d]);
        // Gates up to +-20 reach both branches of the stable sigmoid; beyond ~87,
        // sigmoid(-g) is an f32 denormal that GPUs flush to zero.
        const [gg, cg] = both(be, randn(n, 20), [n, 1]);
        await expectClose("add", be.add(ga, gb), cpu.add(ca, cb), ELEMENTWISE_TOL);
        await expectClose("swiglu", be.swiglu(ga, gb), cpu.swiglu(ca, cb), ELEMENTWISE_TOL);
        await expectClose("clamp", be.clamp(ga, 7.5), cpu.clamp(ca, 7.5), 0);
        await expectClose("scale", be.scale(ga, -0.37), cpu.scale(ca, -0.37), ELEMENTWISE_TOL);
        await expectClose(
          "sigmoidScaleRows",
          be.sigmoidScaleRows(ga, gg),
          cpu.sigmoidScaleRows(ca, cg),
          ELEMENTWISE_TOL,
        );
      }
    }
  },
});

Deno.test({
  name: "webgpu rope matches cpu (positions with offsets, linear scaling, headDim 8 and 64)",
  ignore,
  async fn() {
    const plain = [[5, 3, 8, 1], [40, 4, 16, 1], [9, 2, 64, 4]];
    for (const [be, sizes] of backends(plain)) {
      for (const [n, heads, hd, factor] of sizes) {
        const d = heads * hd;
        const positions = Int32Array.from({ length: n }, (_, i) => 1000 + 7 * i);
        const [gx, cx] = both(be, randn(n * d, 2), [n, d]);
        await expectClose(
          "rope",
          be.rope(gx, positions, heads, hd, 10000, factor),
          cpu.rope(cx, positions, heads, hd, 10000, factor),
          ELEMENTWISE_TOL * 4,
        );
      }
    }
  },
});

Deno.test({
  name: "webgpu splitQkv matches cpu (with and without RoPE, GQA, chunked rows)",
  ignore,
  async fn() {
    // [rows, heads, kvHeads, headDim]: GQA 6/2, MHA, head_dim 64 with linear scaling.
    const plain = [[5, 6, 2, 8], [40, 4, 4, 16], [9, 2, 1, 64]];
    for (const [be, sizes] of backends(plain)) {
      for (const [n, heads, kvHeads, hd] of sizes) {
        const d = (heads + 2 * kvHeads) * hd;
        const positions = Int32Array.from({ length: n }, (_, i) => 1000 + 7 * i);
        const [gx, cx] = both(be, randn(n * d, 2), [n, d]);
        for (const rope of [null, { positions, theta: 10000, linearFactor: hd === 64 ? 4 : 1 }]) {
          const got = be.splitQkv(gx, heads, kvHeads, hd, rope);
          const want = cpu.splitQkv(cx, heads, kvHeads, hd, rope);
          for (const part of ["q", "k", "v"] as const) {
            await expectClose(`splitQkv ${part}`, got[part], want[part], ELEMENTWISE_TOL * 4);
          }
        }
      }
    }
    const x = gpu!.tensor(randn(2 * 40), [2, 40]);
    assert.throws(() => gpu!.splitQkv(x, 2, 1, 9, null), /not \(2 \+ 2 x 1\) heads of an even 9/);
    const rope = { positions: Int32Array.of(0), theta: 1e4, linearFactor: 1 };
    assert.throws(() => gpu!.splitQkv(x, 2, 1, 10, rope), /1 positions, 2 rows/);
  },
});

Deno.test({
  name: "webgpu splitQkvIntoCache matches cpu (whole caches bound, and per sequence when chunked)",
  ignore,
  async fn() {
    // [batch, seqLen, capacity, past, heads, kvHeads, headDim]: decode steps, a prefill.
    const shapes = [[1, 1, 9, 4, 6, 2, 8], [3, 1, 5, 2, 4, 4, 16], [2, 6, 11, 3, 2, 1, 64]];
    for (const [be, sizes] of backends(shapes)) {
      for (const [batch, seqLen, capacity, past, heads, kvHeads, hd] of sizes) {
        const n = batch * seqLen, d = (heads + 2 * kvHeads) * hd, kw = kvHeads * hd;
        const positions = Int32Array.from({ length: n }, (_, r) => past + r % seqLen);
        const rope = { positions, theta: 10000, linearFactor: 1 };
        const [gx, cx] = both(be, randn(n * d, 2), [n, d]);
        const before = randn(batch * capacity * kw);
        const caches = (b: Backend) => ({
          k: b.tensor(before.slice(), [batch * capacity, kw]),
          v: b.tensor(before.slice(), [batch * capacity, kw]),
          seqLen,
          capacity,
          past,
        });
        const gc = caches(be), cc = caches(cpu);
        const got = be.splitQkvIntoCache(gx, heads, kvHeads, hd, rope, gc);
        const want = cpu.splitQkvIntoCache(cx, heads, kvHeads, hd, rope, cc);
        await expectClose("splitQkvIntoCache q", got, want, ELEMENTWISE_TOL * 4);
        await expectClose("splitQkvIntoCache k", gc.k, cc.k, ELEMENTWISE_TOL * 4);
        await expectClose("splitQkvIntoCache v", gc.v, cc.v, ELEMENTWISE_TOL * 4);
      }
    }
  },
});

async function checkAttention(be: Backend, s: AttentionShape) {
  const qw = s.heads * s.headDim, kw = s.kvHeads * s.headDim;
  const [gq, cq] = both(be, randn(s.batch * s.qLen * qw, 2), [s.batch * s.qLen, qw]);
  const [gk, ck] = both(be, randn(s.batch * s.kvLen * kw, 2), [s.batch * s.kvLen, kw]);
  const [gv, cv] = both(be, randn(s.batch * s.kvLen * kw), [s.batch * s.kvLen, kw]);
  await expectClose(
    "attention",
    be.attention(gq, gk, gv, s),
    cpu.attention(cq, ck, cv, s),
    ELEMENTWISE_TOL * 10,
  );
}

Deno.test({
  name: "webgpu attention matches cpu: causal, GQA, qLen < kvLen, sliding window, headDim 8/64",
  ignore,
  async fn() {
    const shapes: AttentionShape[] = [
      { batch: 1, qLen: 1, kvLen: 1, heads: 1, kvHeads: 1, headDim: 8, window: null },
      { batch: 2, qLen: 7, kvLen: 7, heads: 4, kvHeads: 4, headDim: 8, window: null },
      { batch: 3, qLen: 5, kvLen: 33, heads: 8, kvHeads: 2, headDim: 64, window: null },
      { batch: 2, qLen: 1, kvLen: 40, heads: 4, kvHeads: 1, headDim: 64, window: null },
      { batch: 2, qLen: 17, kvLen: 17, heads: 4, kvHeads: 2, headDim: 16, window: 4 },
      { batch: 1, qLen: 6, kvLen: 30, heads: 2, kvHeads: 1, headDim: 8, window: 9 },
      { batch: 1, qLen: 3, kvLen: 3, heads: 2, kvHeads: 2, headDim: 128, window: 1 },
    ];
    for (const s of shapes) await checkAttention(gpu!, s);
    // 6 sequences of 1 KiB queries: bound as 2 chunks of 3 sequences at 4 KiB.
    const split: AttentionShape[] = [
      { batch: 6, qLen: 4, kvLen: 6, heads: 4, kvHeads: 2, headDim: 16, window: null },
      // 288-byte query blocks: chunks of 13 sequences starting at unaligned offsets.
      { batch: 20, qLen: 3, kvLen: 7, heads: 3, kvHeads: 1, headDim: 8, window: 5 },
    ];
    for (const s of split) await checkAttention(chunked!, s);
  },
});

async function checkRoute(be: Backend, logits: Float32Array, e: number, k: number) {
  const n = logits.length / e;
  for (const normalize of [false, true]) {
    const got = await be.routeTopK(be.tensor(logits, [n, e]), k, normalize, 1e-20);
    const want = await cpu.routeTopK(cpu.tensor(logits, [n, e]), k, normalize, 1e-20);
    assert.deepEqual(got.indices, want.indices, `routeTopK: experts differ (k ${k})`);
    const err = relError(`routeTopK normalize=${normalize}`, got.weights, want.weights);
    assert(err <= ELEMENTWISE_TOL, `routeTopK: weights differ by ${err}`);
    if (normalize) {
      for (let r = 0; r < n; r++) {
        const sum = got.weights.subarray(r * k, (r + 1) * k).reduce((a, b) => a + b, 0);
        assert(Math.abs(sum - 1) < 1e-6, `routeTopK: renormalised weights sum to ${sum}`);
      }
    }
  }
}

Deno.test({
  name: "webgpu argmaxRows matches argmaxRow: odd widths, ties, -inf and NaN, chunked rows",
  ignore,
  async fn() {
    const check = async (be: Backend, x: Float32Array, cols: number) => {
      const rows = x.length / cols;
      const want = Int32Array.from({ length: rows }, (_, r) => argmaxRow(x, r, cols));
      const ids = be.argmaxRows(be.tensor(x, [rows, cols]));
      assert.deepEqual([...ids.shape], [rows]);
      assert.deepEqual(idsOf(await be.read(ids)), want, `${rows} x ${cols}`);
      const onCpu = cpu.argmaxRows(cpu.tensor(x, [rows, cols]));
      assert.deepEqual(idsOf(await cpu.read(onCpu)), want, `cpu ${rows} x ${cols}`);
    };
    // widths below, at and past the 256 threads; 40 x 300 f32 rows span 3 chunked bindings
    for (const be of [gpu!, chunked!]) {
      for (const [rows, cols] of [[1, 1], [3, 7], [5, 255], [2, 256], [40, 300], [3, 777]]) {
        await check(be, randn(rows * cols), cols);
      }
    }
    // the first of equal maxima, wherever the threads meet; NaN never wins; all -inf is 0
    const cols = 600, rows = 6, x = new Float32Array(rows * cols).fill(-1);
    for (const [r, js] of [[0, [599, 3, 300]], [1, [256, 0]], [2, [511, 257]]] as const) {
      for (const j of js) x[r * cols + j] = 5;
    }
    x.fill(Number.NaN, 3 * cols, 4 * cols), x[3 * cols + 400] = -2; // NaN row but one
    x.fill(-Infinity, 4 * cols, 5 * cols);
    x.fill(Number.NaN, 5 * cols, 6 * cols);
    await check(gpu!, x, cols);
    const ids = idsOf(await gpu!.read(gpu!.argmaxRows(gpu!.tensor(x, [rows, cols]))));
    assert.deepEqual([...ids], [3, 0, 257, 400, 0, 0]);
    // an id tensor feeds embedding as its host ids would
    for (const be of [gpu!, chunked!]) {
      const raw = rawWeight("embed", [300, 64], randn(300 * 64), "BF16");
      const w = be.uploadWeight(raw), logits = randn(9 * 300);
      const onDevice = be.argmaxRows(be.tensor(logits, [9, 300]));
      const host = Int32Array.from({ length: 9 }, (_, r) => argmaxRow(logits, r, 300));
      await expectClose(
        "embedding of argmaxRows",
        be.embedding(w, onDevice),
        cpu.embedding(cpu.uploadWeight(raw), host),
        0,
      );
      be.freeWeight(w);
    }
  },
});

Deno.test({
  name: "webgpu routeTopK matches cpu: k 1..8, renorm on and off, ties to the lower index",
  ignore,
  async fn() {
    for (const [n, e, k] of [[1, 4, 1], [33, 16, 4], [7, 60, 4], [70, 64, 8], [5, 8, 8]]) {
      await checkRoute(gpu!, randn(n * e, 4), e, k);
    }
    // Exact ties: every row has repeated values; order must be by index among equals.
    const ties = new Float32Array([0, 1, 1, 0, 2, 2, 0, 1, 3, 3, 3, 3, 0, 0, 0, 0]);
    await checkRoute(gpu!, ties, 8, 5);
    const got = await gpu!.routeTopK(gpu!.tensor(ties, [2, 8]), 5, false, 0);
    assert.deepEqual([...got.indices.subarray(0, 5)], [4, 5, 1, 2, 7]);
    assert.deepEqual([...got.indices.subarray(5)], [0, 1, 2, 3, 4]);
    await checkRoute(chunked!, randn(100 * 16, 4), 16, 4);
    await checkRoute(chunked!, randn(70 * 60, 4), 60, 8);
  },
});

Deno.test({
  name: "webgpu gatherRows and scatterAddRows match cpu, plain and chunked",
  ignore,
  async fn() {
    const plain = [[1, 3, 1], [33, 65, 9], [40, 64, 25]];
    for (const [be, sizes] of backends(plain)) {
      for (const [n, h, picked] of sizes) {
        const [gx, cx] = both(be, randn(n * h), [n, h]);
        const rows = distinctRows(picked, n);
        await expectClose("gatherRows", be.gatherRows(gx, rows), cpu.gatherRows(cx, rows), 0);

        const outData = randn(n * h);
        const [gout, cout] = both(be, outData, [n, h]);
        const [gy, cy] = both(be, randn(picked * h), [picked, h]);
        const scales = randn(picked);
        be.scatterAddRows(gout, gy, rows, scales);
        cpu.scatterAddRows(cout, cy, rows, scales);
        await expectClose("scatterAddRows", gout, cout, ELEMENTWISE_TOL);
      }
    }
  },
});

Deno.test({
  name: "webgpu tensors round-trip and the backend names its adapter",
  ignore,
  async fn() {
    const data = randn(1001);
    assert.deepEqual(await gpu!.read(gpu!.tensor(data, [7, 143])), data);
    assert.equal((await gpu!.read(gpu!.tensor(new Float32Array(0), [0, 4]))).length, 0);
    assert.equal(gpu!.name, "webgpu");
    assert(gpu!.description.length > 0);
  },
});

Deno.test({
  name: "bind groups are reused by a repeated step and never bind a freed weight",
  ignore,
  async fn() {
    const [x, cx] = both(gpu!, randn(2 * 24), [2, 24]);
    const step = async (weight: Weight) => {
      const y = gpu!.matmul(x, weight), values = await gpu!.read(y);
      gpu!.free(y);
      return values;
    };
    const first = rawWeight("w", [9, 24], randn(9 * 24), "BF16");
    const w1 = gpu!.uploadWeight(first);
    const encoded = gpu!.encodeMilliseconds;
    await step(w1);
    assert(gpu!.encodeMilliseconds > encoded, "the step's encoding is counted");
    const created = gpu!.bindGroupsCreated;
    // The same step again: same uniform slot, weight, input and (pooled) output buffer.
    await step(w1);
    assert.equal(gpu!.bindGroupsCreated, created);
    // A new weight of the same shape after the old one is destroyed gets its own group.
    gpu!.freeWeight(w1);
    const second = rawWeight("w", [9, 24], randn(9 * 24), "BF16");
    const w2 = gpu!.uploadWeight(second);
    const got = await step(w2);
    assert(gpu!.bindGroupsCreated > created);
    const want = await cpu.read(cpu.matmul(cx, cpu.uploadWeight(second)));
    assert(relError("matmul after a freed weight", got, want) <= MATMUL_TOL);
    gpu!.free(x), gpu!.freeWeight(w2);
  },
});

Deno.test({
  name: "timeKernels counts every dispatch by kernel and leaves the results unchanged",
  ignore,
  async fn() {
    if (!gpu!.device.features.has("timestamp-query")) {
      await assert.rejects(gpu!.timeKernels(async () => {}), /no "timestamp-query" feature/);
      return;
    }
    const [x, cx] = both(gpu!, randn(3 * 40), [3, 40]);
    const w = rawWeight("w", [50, 40], randn(50 * 40), "BF16");
    const gw = gpu!.uploadWeight(w), cw = cpu.uploadWeight(w);
    const gemv = gpu!.withOptions({ matmulKernel: "gemv" });
    let product: Tensor | null = null, sum: Tensor | null = null;
    // Past one batch (1,024 dispatches), so timestamps of two submits are gathered.
    const times = await gpu!.timeKernels(async () => {
      for (let i = 0; i < 600; i++) {
        if (product) gpu!.free(product), gpu!.free(sum!);
        product = gemv.matmul(x, gw);
        sum = gpu!.add(product, product);
      }
      await gpu!.read(sum!); // a read inside the timed work is fine
    });
    const names = [...times.keys()].sort();
    assert.equal(names.length, 2, names.join(", "));
    assert.match(names[0], /^elementwise\.add$/);
    assert.match(names[1], /^matmul_gemv\.main\{.*"ROWS":3/);
    for (const time of times.values()) {
      assert.equal(time.dispatches, 600);
      assert(time.milliseconds > 0 && Number.isFinite(time.milliseconds), `${time.milliseconds}`);
    }
    const want = cpu.matmul(cx, cw);
    await expectClose("matmul under timeKernels", product!, want, MATMUL_TOL);
    // The timer is gone afterwards: dispatches run in one pass again and can be timed anew.
    assert.equal((await gpu!.timeKernels(async () => {})).size, 0);
    await assert.rejects(
      gpu!.timeKernels(() => gpu!.timeKernels(async () => {}).then(() => {})),
      /already running/,
    );
    gpu!.free(product!), gpu!.free(sum!), gpu!.free(x), gpu!.freeWeight(gw);
  },
});

Deno.test({
  name: "webgpu readAll: several tensors (one empty) in one submit, as read gives them",
  ignore,
  async fn() {
    const be = gpu!;
    const values = [randn(5), new Float32Array(0), randn(1000), randn(1)];
    const tensors = values.map((v) => be.tensor(v, [v.length]));
    const submits = be.submits;
    const got = await be.readAll(tensors);
    assert.equal(be.submits - submits, 1);
    assert.deepEqual(got, values);
    assert.deepEqual(await be.readAll([]), []);
    tensors.forEach((x) => be.free(x));
  },
});

Deno.test("f32ToF16Bits rounds to nearest half (checked against f16ToF32)", () => {
  const x = new Float32Array([0, -0, 1, -2.5, 65504, 1e6, 6e-8, 1 + 2 ** -11, 1 + 3 * 2 ** -11]);
  const back = Array.from(f32ToF16Bits(x), f16ToF32);
  assert.deepEqual(back, [0, -0, 1, -2.5, 65504, Infinity, 2 ** -24, 1, 1 + 2 ** -9]);
  for (const v of randn(1000, 100)) {
    const h = f16ToF32(f32ToF16Bits(new Float32Array([v]))[0]);
    assert(Math.abs(h - v) <= Math.abs(v) * 2 ** -11 + 2 ** -25, `${v} -> ${h}`);
  }
});

Deno.test("no adapter: fails under CI=true, ignored with a warning elsewhere", async () => {
  const noAdapter = () => Promise.reject(new NoWebGpuAdapterError("no WebGPU adapter found"));
  await assert.rejects(webgpuForTests(noAdapter, "true"), /CI=true/);
  const warn = console.warn;
  let warned = "";
  console.warn = (msg: string) => (warned = msg);
  try {
    assert.equal(await webgpuForTests(noAdapter, "false"), null);
  } finally {
    console.warn = warn;
  }
  assert.match(warned, /IGNORED/);
  // Any other failure is never swallowed.
  const broken = () => Promise.reject(new Error("device lost"));
  await assert.rejects(webgpuForTests(broken, "false"), /device lost/);
});

Deno.test({
  name: "webgpu worst errors per op (report)",
  ignore,
  fn() {
    for (const [op, err] of [...maxErrors].sort()) console.log(`  ${op}: ${err.toExponential(2)}`);
  },
});
