// The CPU backend's elementwise passes split over worker threads (cpu_rows.ts) against one
// thread: every row is computed the same way wherever it runs, so results are bit-identical.
// Sizes are above the split threshold and odd, so the rows divide unevenly.
import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { rowKernels, RowThreads, sharedFloats } from "../lib/backend/cpu_rows.ts";
import { f32Tensor } from "../lib/io/safetensors.ts";
import { Model } from "../lib/model/model.ts";
import { forward } from "../lib/model/decoder.ts";
import { DEFAULT_MODEL } from "./golden.ts";
import { assertIdentical, maxRelError, randn } from "./util.ts";
import { compileSimd, SIMD_TS } from "../scripts/build_simd.ts";

/**
 * rmsNorm(x), addRmsNorm(x, y) (sum, normed), rope(x) and ropeBackward(y) on rows of
 * heads x hd, read back.
 */
async function normsAndRope(
  be: CpuBackend,
  x: Float32Array,
  y: Float32Array,
  normWeight: Float32Array,
  heads: number,
  hd: number,
  positions: Int32Array,
): Promise<Float32Array[]> {
  const d = heads * hd, n = x.length / d;
  const weight = be.uploadWeight(f32Tensor("norm", [d], normWeight));
  const a = be.tensor(x, [n, d]), b = be.tensor(y, [n, d]);
  const { sum, normed } = be.addRmsNorm(a, b, weight, 1e-6);
  return await be.readAll([
    be.rmsNorm(a, weight, 1e-5),
    sum,
    normed,
    be.rope(a, positions, heads, hd, 10000, 1),
    be.ropeBackward(b, positions, heads, hd, 500, 2),
  ]);
}

const one = new CpuBackend({ threads: 1 });
const three = new CpuBackend({ threads: 3 }); // more threads than CI's cores: still exact

Deno.test("cpu threads: the backend says how many threads it uses", () => {
  assert.match(three.description, /, 3 threads$/);
  assert.doesNotMatch(one.description, /threads/);
  assert.doesNotMatch(new CpuBackend({ reference: true }).description, /threads/);
  assert.throws(() => new CpuBackend({ threads: 0 }), /threads must be a positive integer, got 0/);
  try {
    Deno.env.set("MOE_CONDENSE_THREADS", "5");
    assert.match(new CpuBackend().description, /, 5 threads$/);
    Deno.env.set("MOE_CONDENSE_THREADS", "two");
    assert.throws(
      () => new CpuBackend(),
      /MOE_CONDENSE_THREADS must be a positive integer, got "two"/,
    );
  } finally {
    Deno.env.delete("MOE_CONDENSE_THREADS");
  }
});

Deno.test("cpu threads: the default model's forward is bit-identical on 1 and 3 threads", async () => {
  // 4 x 67 tokens: every split op (norms, SwiGLU, RoPE, softmax, combine) crosses the
  // threshold, and the attention softmax spans several (sequence, head) blocks.
  const batch = 4, seqLen = 67;
  const ids = new Int32Array(batch * seqLen).map((_, i) => (i * 7919 + 13) % 256);
  const logits = [];
  for (const be of [one, three]) {
    const model = await Model.load(DEFAULT_MODEL, be);
    logits.push((await forward(model, ids, { batch, seqLen })).logits);
  }
  assertIdentical([logits[1]], [logits[0]], "logits");
});

Deno.test("cpu threads: rmsNorm, addRmsNorm, rope, ropeBackward are bit-identical", async () => {
  const n = 1237, heads = 3, hd = 32, d = heads * hd;
  const x = randn(n * d, 1), y = randn(n * d, 2), wv = randn(d, 3);
  const positions = new Int32Array(n).map((_, i) => (i * 13) % 301);
  const results = [];
  for (const be of [one, three]) {
    results.push(await normsAndRope(be, x, y, wv, heads, hd, positions));
  }
  assertIdentical(results[1], results[0], "rmsNorm, addRmsNorm (sum, normed), rope, ropeBackward");
});

Deno.test("cpu threads: attention and its backward are bit-identical (GQA, window, qLen < kvLen)", async () => {
  for (
    const s of [
      // (sequence, head) pairs x qLen x kvLen above the split threshold
      { batch: 3, qLen: 77, kvLen: 77, heads: 4, kvHeads: 2, headDim: 16, window: null },
      { batch: 2, qLen: 90, kvLen: 131, heads: 3, kvHeads: 1, headDim: 8, window: 20 },
    ]
  ) {
    const q = randn(s.batch * s.qLen * s.heads * s.headDim, 4);
    const k = randn(s.batch * s.kvLen * s.kvHeads * s.headDim, 5);
    const v = randn(s.batch * s.kvLen * s.kvHeads * s.headDim, 6);
    const dOut = randn(q.length, 7);
    const results = [];
    for (const be of [one, three]) {
      const qt = be.tensor(q, [s.batch * s.qLen, s.heads * s.headDim]);
      const kt = be.tensor(k, [s.batch * s.kvLen, s.kvHeads * s.headDim]);
      const vt = be.tensor(v, [s.batch * s.kvLen, s.kvHeads * s.headDim]);
      const grads = be.attentionBackward(qt, kt, vt, be.tensor(dOut, qt.shape), s);
      results.push(
        await be.readAll([be.attention(qt, kt, vt, s), grads.dq, grads.dk, grads.dv]),
      );
    }
    assertIdentical(results[1], results[0], `attention, dq, dk, dv ${JSON.stringify(s)}`);
  }
});

Deno.test("cpu threads: combineRows into an array outside shared memory runs on one thread, exactly", async () => {
  const n = 2003, k = 3, h = 40, rows = 701;
  const ys = randn(rows * h, 8), base = randn(n * h, 9);
  const sources = new Int32Array(n * k).map((_, i) => (i * 31) % rows);
  const scales = randn(n * k, 10);
  const outs = [];
  for (const be of [one, three]) {
    const out = be.tensor(base.slice(), [n, h]); // a plain array: a worker would write a copy
    be.combineRows(out, be.tensor(ys, [rows, h]), sources, scales, k);
    outs.push(await be.read(out));
  }
  assertIdentical([outs[1]], [outs[0]], "combineRows");
});

Deno.test("cpu threads: RowThreads splits rows unevenly, with fewer rows than threads, exactly", () => {
  for (const simd of [false, true]) {
    for (const [rows, width, threads] of [[3, 32768, 5], [10007, 8, 2], [9001, 12, 4]]) {
      const gateUp = sharedFloats(rows * 2 * width).map((_, i) => Math.sin(i) * 4);
      const want = new Float32Array(rows * width), got = sharedFloats(rows * width);
      rowKernels.swiglu({ gateUp, out: want, width, simd }, 0, rows);
      new RowThreads(threads).run("swiglu", { gateUp, out: got, width, simd }, rows, width, [got]);
      assertIdentical([got], [want], `${rows} rows on ${threads} threads, simd ${simd}`);
    }
  }
});

/** Largest |a - b| / max(|b|, floor) over the entries. */
function worstRelative(a: Float32Array, b: Float32Array, floor: number): number {
  let worst = 0;
  for (let i = 0; i < b.length; i++) {
    worst = Math.max(worst, Math.abs(a[i] - b[i]) / Math.max(Math.abs(b[i]), floor));
  }
  return worst;
}

Deno.test("cpu SIMD SwiGLU and softmax agree with the JS doubles within f32 rounding, extremes included", () => {
  // Gates over the whole f32 range that matters, and past exp's clamp (+-87).
  const rows = 613, width = 36, n = rows * width;
  const gateUp = new Float32Array(2 * n).map((_, i) => {
    const x = Math.sin(i * 0.37) * (i % 7 === 0 ? 120 : 9);
    return i % 11 === 0 ? 0 : x;
  });
  const out = [false, true].map((simd) => {
    const o = new Float32Array(n);
    rowKernels.swiglu({ gateUp, out: o, width, simd }, 0, rows);
    return o;
  });
  // Below a gate of -88 exp is clamped: silu is then 1e-36 instead of 1e-38, compared absolutely.
  const swigluError = worstRelative(out[1], out[0], 1e-6);
  assert(swigluError < 1e-6, `SwiGLU: SIMD off by ${swigluError} relative`);

  // Score rows with a window, very negative and tied entries, 1 to 131 visible keys; two
  // blocks of queries after a cache (qLen < kvLen), and a range that starts mid-block.
  for (const [qLen, kvLen, blocks, r0] of [[131, 131, 1, 0], [50, 131, 2, 7]]) {
    const rows = blocks * qLen;
    const scores = new Float32Array(rows * kvLen).map((_, i) =>
      i % 13 === 0 ? -1e30 : i % 17 === 0 ? 5 : Math.cos(i * 0.71) * 30
    );
    for (const window of [null, 40]) {
      const probs = [false, true].map((simd) => {
        const p = scores.slice();
        rowKernels.softmaxVisible({ scores: p, qLen, kvLen, window, simd }, r0, rows);
        return p;
      });
      // x - max is rounded to f32 (as in PyTorch): half an ulp of up to 60 here, 1.9e-6, is a
      // relative error of e^x. Probabilities below 1e-30 are underflow: compared absolutely.
      const label = `softmax ${qLen}/${kvLen} window ${window}`;
      const softmaxError = worstRelative(probs[1], probs[0], 1e-30);
      assert(softmaxError < 3e-6, `${label}: SIMD off by ${softmaxError} relative`);
      for (let r = r0; r < rows; r++) {
        let sum = 0;
        for (let j = 0; j < kvLen; j++) sum += probs[1][r * kvLen + j];
        assert(Math.abs(sum - 1) < 1e-6, `${label}: row ${r} sums to ${sum}`);
      }
      // Rows before r0 are not touched.
      assertIdentical([probs[1].subarray(0, r0 * kvLen)], [scores.subarray(0, r0 * kvLen)], label);
    }
  }
});

Deno.test("cpu SIMD: swiglu and swigluBackward of gate and up apart agree with the JS doubles", async () => {
  // Odd lengths (a JS tail after whole lanes), one below the split threshold, one above.
  for (const n of [1001, 70003]) {
    const gate = new Float32Array(n).map((_, i) => Math.sin(i * 0.37) * (i % 7 === 0 ? 60 : 6));
    const up = randn(n, 11), dy = randn(n, 12);
    const results: Float32Array[][] = [];
    for (const be of [new CpuBackend({ reference: true }), three]) {
      const g = be.tensor(gate, [n]), u = be.tensor(up, [n]);
      const { dGate, dUp } = be.swigluBackward(g, u, be.tensor(dy, [n]));
      results.push(await be.readAll([be.swiglu(g, u), dGate, dUp]));
    }
    ["swiglu", "dGate", "dUp"].forEach((name, k) => {
      // f32 arithmetic against doubles, relative to the largest entry: dGate's factor
      // 1 + g (1 - sig) cancels near g = -1.28, in f32 as in PyTorch.
      const error = maxRelError(results[1][k], results[0][k]);
      assert(error < 1e-6, `${name} over ${n}: SIMD off by ${error} of the largest entry`);
    });
  }
});

Deno.test("cpu SIMD: norms, RoPE and combineRows agree with the JS doubles", async () => {
  // Widths that run in lanes (96, head_dim 32) and ones that fall back to JS (42, head_dim
  // 14); more rows than one copy into the module holds; rows of 1e-20 and 1e18 for the norms.
  for (const [heads, hd] of [[3, 32], [3, 14]]) {
    const n = 1237, d = heads * hd, h = d, k = 3, rows = 401;
    const x = randn(n * d, 21), y = randn(n * d, 22), wv = randn(d, 23);
    x.fill(1e-20, 5 * d, 6 * d), x.fill(1e18, 7 * d, 8 * d);
    const positions = new Int32Array(n).map((_, i) => (i * 13) % 301);
    const sources = new Int32Array(n * k).map((_, i) => (i * 31) % rows);
    const scales = randn(n * k, 24), ys = randn(rows * h, 25);
    const results: Float32Array[][] = [];
    for (const be of [new CpuBackend({ reference: true }), three]) {
      const out = be.tensor(sharedFloats(n * h).fill(0.5), [n, h]);
      be.combineRows(out, be.tensor(ys, [rows, h]), sources, scales, k);
      results.push([...await normsAndRope(be, x, y, wv, heads, hd, positions), await be.read(out)]);
    }
    ["rmsNorm", "sum", "addRmsNorm", "rope", "ropeBackward", "combineRows"].forEach((name, i) => {
      const error = maxRelError(results[1][i], results[0][i]);
      assert(error < 1e-6, `${name}, width ${d}: SIMD off by ${error} of the largest entry`);
    });
    // each norm row on its own scale: the 1e-20 and 1e18 rows are as exact as the others
    for (const r of [5, 7]) {
      const row = (o: Float32Array) => o.subarray(r * d, (r + 1) * d);
      const error = maxRelError(row(results[1][0]), row(results[0][0]));
      assert(error < 1e-6, `rmsNorm row ${r}, width ${d}: SIMD off by ${error}`);
    }
  }
});

Deno.test("cpu SIMD: simd_wasm.ts is simd.wat compiled (deno task build-simd)", async () => {
  assert.equal(Deno.readTextFileSync(SIMD_TS), await compileSimd());
  const script = new URL("../scripts/build_simd.ts", import.meta.url).pathname;
  const run = (arg: string) =>
    new Deno.Command(Deno.execPath(), { args: ["run", "-A", script, arg] }).output();
  const help = await run("--help");
  assert.equal(help.code, 0);
  assert.match(new TextDecoder().decode(help.stdout), /Usage:/);
  const bad = await run("--bogus");
  assert.equal(bad.code, 1);
  assert.match(new TextDecoder().decode(bad.stderr), /error: .*bogus/i);
});

Deno.test("cpu threads: a job that cannot be handed over fails clearly, and the next run is exact", () => {
  const threads = new RowThreads(3), rows = 9001, width = 12;
  const gateUp = sharedFloats(rows * 2 * width).map((_, i) => Math.cos(i) * 3);
  const got = sharedFloats(rows * width), want = new Float32Array(rows * width);
  // A function cannot be cloned into a message.
  const args = { gateUp, out: got, width, simd: false, poison: () => {} };
  assert.throws(() => threads.run("swiglu", args, rows, width, [got]), /could not be cloned/);
  threads.run("swiglu", { gateUp, out: got, width, simd: false }, rows, width, [got]);
  rowKernels.swiglu({ gateUp, out: want, width, simd: false }, 0, rows);
  assertIdentical([got], [want], "after a failed run");
});
