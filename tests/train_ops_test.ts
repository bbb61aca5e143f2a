// Every CPU backward op against central finite differences of its forward op (small
// shapes, all entries), for the plain-loop reference and the BLAS and WebAssembly fast paths, plus
// the accumulate (+=) contract and AdamW against a hand-written double formula.
import assert from "node:assert";
import type { AttentionShape, TrainingBackend } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { f32Tensor } from "../lib/io/safetensors.ts";
import { maxRelError, randn } from "./util.ts";
import { dotLoss, fdError, finiteDifference } from "./train_fd.ts";

const reference = new CpuBackend({ reference: true });
const backends: [string, TrainingBackend][] = [
  ["reference", reference],
  ["blas", new CpuBackend()],
  ["wasm", new CpuBackend({ wasmMatmul: true })],
];
const TOL = 2e-3;
const VERBOSE = Deno.env.get("TRAIN_FD_VERBOSE") === "1";

type Inputs = Record<string, Float32Array>;

/**
 * FD of sum(r * forward(inputs)) on the reference backend vs each backend's backward with
 * dy = r, for every input named in the backward's result.
 */
async function check(
  op: string,
  inputs: Inputs,
  forward: (be: TrainingBackend, x: Inputs) => Promise<Float32Array>,
  backward: (be: TrainingBackend, x: Inputs, dy: Float32Array) => Promise<Inputs>,
  h = 1e-2,
): Promise<void> {
  const r = randn((await forward(reference, inputs)).length, 99);
  const loss = async () => dotLoss(await forward(reference, inputs), r);
  const fds = new Map<string, Map<number, number>>();
  for (const [name, be] of backends) {
    const grads = await backward(be, inputs, r);
    for (const [input, g] of Object.entries(grads)) {
      if (!fds.has(input)) fds.set(input, await finiteDifference(inputs[input], loss, h));
      const err = fdError(fds.get(input)!, g);
      if (VERBOSE) console.log(`${op} d${input} (${name}): ${err.toExponential(2)}`);
      assert(err < TOL, `${op} d${input} (${name}): FD error ${err}`);
    }
  }
}

const weight = (be: TrainingBackend, data: Float32Array, shape: number[]) =>
  be.uploadWeight(f32Tensor("w", shape, data));
const zeros = (be: TrainingBackend, shape: number[]) =>
  be.tensor(new Float32Array(shape.reduce((a, b) => a * b, 1)), shape);

Deno.test("train op: matmul backward (dx, dW, dbias) vs FD", async () => {
  const [n, k, m] = [5, 7, 4];
  await check(
    "matmul",
    { x: randn(n * k, 1), w: randn(m * k, 2), b: randn(m, 3) },
    (be, { x, w, b }) =>
      be.read(be.matmul(be.tensor(x, [n, k]), weight(be, w, [m, k]), weight(be, b, [m]))),
    async (be, { x, w }, dy) => {
      const wg = zeros(be, [m, k]), bg = zeros(be, [m]);
      const dx = be.matmulBackward(
        be.tensor(x, [n, k]),
        weight(be, w, [m, k]),
        be.tensor(dy, [n, m]),
        {
          needInput: true,
          weightGrad: wg,
          biasGrad: bg,
        },
      )!;
      return { x: await be.read(dx), w: await be.read(wg), b: await be.read(bg) };
    },
  );
});

Deno.test("train op: matmul backward accumulates into weightGrad, needInput false gives null", async () => {
  const [n, k, m] = [33, 65, 17];
  const x = randn(n * k, 4), w = randn(m * k, 5), dy = randn(n * m, 6);
  const results: Float32Array[] = [];
  for (const [, be] of backends) {
    const wg = zeros(be, [m, k]);
    for (let i = 0; i < 2; i++) {
      const dx = be.matmulBackward(
        be.tensor(x, [n, k]),
        weight(be, w, [m, k]),
        be.tensor(dy, [n, m]),
        {
          needInput: false,
          weightGrad: wg,
        },
      );
      assert.strictEqual(dx, null);
    }
    results.push(await be.read(wg));
  }
  const once = zeros(reference, [m, k]);
  reference.matmulBackward(
    reference.tensor(x, [n, k]),
    weight(reference, w, [m, k]),
    reference.tensor(dy, [n, m]),
    {
      needInput: false,
      weightGrad: once,
    },
  );
  const twice = (await reference.read(once)).map((v) => 2 * v);
  assert(maxRelError(results[0], twice) < 1e-6);
  for (let i = 1; i < results.length; i++) {
    assert(
      maxRelError(results[i], results[0]) < 1e-5,
      `${backends[i][0]} vs loops ${maxRelError(results[i], results[0])}`,
    );
  }
});

Deno.test("train op: rmsNorm backward (dx, dw) vs FD", async () => {
  const [n, d] = [3, 8];
  await check(
    "rmsNorm",
    { x: randn(n * d, 7), w: randn(d, 8) },
    (be, { x, w }) => be.read(be.rmsNorm(be.tensor(x, [n, d]), weight(be, w, [d]), 1e-5)),
    async (be, { x, w }, dy) => {
      const wg = zeros(be, [d]);
      const dx = be.rmsNormBackward(
        be.tensor(x, [n, d]),
        weight(be, w, [d]),
        be.tensor(dy, [n, d]),
        1e-5,
        wg,
      );
      return { x: await be.read(dx), w: await be.read(wg) };
    },
  );
});

Deno.test("train op: swiglu backward vs FD", async () => {
  const shape = [3, 6];
  await check(
    "swiglu",
    { g: randn(18, 9, 2), u: randn(18, 10) },
    (be, { g, u }) => be.read(be.swiglu(be.tensor(g, shape), be.tensor(u, shape))),
    async (be, { g, u }, dy) => {
      const { dGate, dUp } = be.swigluBackward(
        be.tensor(g, shape),
        be.tensor(u, shape),
        be.tensor(dy, shape),
      );
      return { g: await be.read(dGate), u: await be.read(dUp) };
    },
  );
});

Deno.test("train op: clamp backward vs FD", async () => {
  // keep entries away from the kinks at +-limit so the FD step does not cross one
  const x = randn(24, 11, 2).map((v) => (Math.abs(Math.abs(v) - 1.5) < 0.05 ? 0 : v));
  await check(
    "clamp",
    { x },
    (be, { x }) => be.read(be.clamp(be.tensor(x, [4, 6]), 1.5)),
    async (be, { x }, dy) => ({
      x: await be.read(be.clampBackward(be.tensor(x, [4, 6]), be.tensor(dy, [4, 6]), 1.5)),
    }),
  );
});

Deno.test("train op: rope backward vs FD (linear scaling)", async () => {
  const [heads, hd] = [2, 8], pos = new Int32Array([0, 1, 2, 5]);
  const shape = [4, heads * hd];
  await check(
    "rope",
    { x: randn(4 * heads * hd, 12) },
    (be, { x }) => be.read(be.rope(be.tensor(x, shape), pos, heads, hd, 10000, 2)),
    async (be, _, dy) => ({
      x: await be.read(be.ropeBackward(be.tensor(dy, shape), pos, heads, hd, 10000, 2)),
    }),
  );
});

Deno.test("train op: attention backward vs FD (causal, GQA, qLen < kvLen, window)", async () => {
  const shapes: AttentionShape[] = [
    { batch: 2, qLen: 5, kvLen: 5, heads: 4, kvHeads: 2, headDim: 4, window: null },
    { batch: 1, qLen: 3, kvLen: 6, heads: 2, kvHeads: 1, headDim: 4, window: null },
    { batch: 1, qLen: 6, kvLen: 6, heads: 2, kvHeads: 2, headDim: 4, window: 3 },
  ];
  for (const s of shapes) {
    const qShape = [s.batch * s.qLen, s.heads * s.headDim];
    const kShape = [s.batch * s.kvLen, s.kvHeads * s.headDim];
    await check(
      `attention ${JSON.stringify(s)}`,
      {
        q: randn(qShape[0] * qShape[1], 13),
        k: randn(kShape[0] * kShape[1], 14),
        v: randn(kShape[0] * kShape[1], 15),
      },
      (be, { q, k, v }) =>
        be.read(be.attention(be.tensor(q, qShape), be.tensor(k, kShape), be.tensor(v, kShape), s)),
      async (be, { q, k, v }, dy) => {
        const g = be.attentionBackward(
          be.tensor(q, qShape),
          be.tensor(k, kShape),
          be.tensor(v, kShape),
          be.tensor(dy, qShape),
          s,
        );
        return { q: await be.read(g.dq), k: await be.read(g.dk), v: await be.read(g.dv) };
      },
    );
  }
});

Deno.test("train op: embedding backward vs FD (repeated ids accumulate)", async () => {
  const ids = new Int32Array([3, 1, 3, 7]);
  await check(
    "embedding",
    { table: randn(40, 16) },
    (be, { table }) => be.read(be.embedding(weight(be, table, [10, 4]), ids)),
    async (be, _, dy) => {
      const tg = zeros(be, [10, 4]);
      be.embeddingBackward(ids, be.tensor(dy, [4, 4]), tg);
      return { table: await be.read(tg) };
    },
  );
});

Deno.test("train op: scatterAddRows backward (dy, dScales) vs FD", async () => {
  const rows = new Int32Array([4, 0, 2]), base = randn(20, 17);
  await check(
    "scatterAddRows",
    { y: randn(12, 18), scales: randn(3, 19) },
    (be, { y, scales }) => {
      const out = be.tensor(base.slice(), [5, 4]);
      be.scatterAddRows(out, be.tensor(y, [3, 4]), rows, scales);
      return be.read(out);
    },
    async (be, { y, scales }, dOut) => {
      const g = be.scatterAddRowsBackward(
        be.tensor(dOut, [5, 4]),
        be.tensor(y, [3, 4]),
        rows,
        scales,
      );
      return { y: await be.read(g.dy), scales: await be.read(g.dScales) };
    },
  );
});

Deno.test("train op: routeTopK backward vs FD (normalised and not)", async () => {
  const [n, e, k] = [4, 6, 2];
  for (const normalize of [true, false]) {
    // well separated logits so the FD step never changes the top-k choice
    const logits = Float32Array.from({ length: n * e }, (_, i) => ((i * 7) % 11) * 0.37 - 1.5);
    await check(
      `routeTopK normalize=${normalize}`,
      { logits },
      async (be, { logits }) =>
        (await be.routeTopK(be.tensor(logits, [n, e]), k, normalize, 1e-20)).weights,
      async (be, { logits }, dW) => {
        const lt = be.tensor(logits, [n, e]);
        const routing = await be.routeTopK(lt, k, normalize, 1e-20);
        return { logits: await be.read(be.routeTopKBackward(lt, routing, dW, normalize, 1e-20)) };
      },
      1e-3,
    );
  }
});

Deno.test("train op: sigmoidScaleRows backward vs FD", async () => {
  await check(
    "sigmoidScaleRows",
    { y: randn(15, 20), g: randn(3, 21) },
    (be, { y, g }) => be.read(be.sigmoidScaleRows(be.tensor(y, [3, 5]), be.tensor(g, [3, 1]))),
    async (be, { y, g }, dOut) => {
      const r = be.sigmoidScaleRowsBackward(
        be.tensor(y, [3, 5]),
        be.tensor(g, [3, 1]),
        be.tensor(dOut, [3, 5]),
      );
      return { y: await be.read(r.dy), g: await be.read(r.dg) };
    },
  );
});

Deno.test("train op: crossEntropy loss and gradient vs FD (ignored rows)", async () => {
  const targets = new Int32Array([2, -100, 6, 0, 3]);
  await check(
    "crossEntropy",
    { logits: randn(35, 22, 2) },
    async (be, { logits }) =>
      new Float32Array([(await be.crossEntropy(be.tensor(logits, [5, 7]), targets, -100)).loss]),
    async (be, { logits }, dy) => {
      const r = await be.crossEntropy(be.tensor(logits, [5, 7]), targets, -100, dy[0] / 4);
      assert.strictEqual(r.count, 4);
      return { logits: await be.read(r.dLogits) };
    },
  );
  // the loss is the mean negative log-likelihood of the counted rows
  const logits = randn(35, 22, 2);
  const { loss } = await reference.crossEntropy(reference.tensor(logits, [5, 7]), targets, -100);
  let expect = 0;
  for (const [r, tgt] of [[0, 2], [2, 6], [3, 0], [4, 3]]) {
    let s = 0;
    for (let j = 0; j < 7; j++) s += Math.exp(logits[r * 7 + j]);
    expect += Math.log(s) - logits[r * 7 + tgt];
  }
  assert(Math.abs(loss - expect / 4) < 1e-6, `${loss} vs ${expect / 4}`);
});

Deno.test("train op: adamwStep matches torch.optim.AdamW's formula over 3 steps", async () => {
  const p0 = randn(10, 23), grads = [randn(10, 24), randn(10, 25), randn(10, 26)];
  const hp = { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, gradScale: 0.5 };
  const be = reference;
  const param = be.uploadTrainableWeight(f32Tensor("p", [10], p0));
  assert.strictEqual(param.dtype, "F32");
  const m = zeros(be, [10]), v = zeros(be, [10]);
  // torch: p *= 1 - lr wd; p -= lr mhat / (sqrt(vhat) + eps)
  const p = Float64Array.from(p0), mm = new Float64Array(10), vv = new Float64Array(10);
  for (let step = 1; step <= 3; step++) {
    be.adamwStep(param, be.tensor(grads[step - 1], [10]), m, v, { ...hp, step });
    for (let i = 0; i < 10; i++) {
      const g = hp.gradScale * grads[step - 1][i];
      mm[i] = 0.9 * mm[i] + 0.1 * g;
      vv[i] = 0.999 * vv[i] + 0.001 * g * g;
      p[i] *= 1 - hp.lr * hp.weightDecay;
      p[i] -= hp.lr * (mm[i] / (1 - 0.9 ** step)) / (Math.sqrt(vv[i] / (1 - 0.999 ** step)) + 1e-8);
    }
  }
  assert(maxRelError(await be.readWeight(param), p) < 1e-6);
});

Deno.test("train op: adamwStep in SIMD lanes agrees with the JS doubles over 5 steps", async () => {
  // An odd length (a JS tail after whole lanes), zero and large gradients among them.
  const n = 1003, p0 = randn(n, 31);
  const grads = [32, 33, 34, 35, 36].map((seed) =>
    randn(n, seed, 3).fill(0, 10, 20).fill(1e4, 20, 25)
  );
  const hp = { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, gradScale: 0.25 };
  const results: Float32Array[][] = [];
  for (const be of [reference, new CpuBackend({ threads: 1 })]) {
    const param = be.uploadTrainableWeight(f32Tensor("p", [n], p0));
    const m = zeros(be, [n]), v = zeros(be, [n]);
    for (let step = 1; step <= 5; step++) {
      be.adamwStep(param, be.tensor(grads[step - 1], [n]), m, v, { ...hp, step });
    }
    results.push([await be.readWeight(param), await be.read(m), await be.read(v)]);
  }
  ["param", "m", "v"].forEach((name, i) => {
    const error = maxRelError(results[1][i], results[0][i]);
    assert(error < 1e-6, `${name}: SIMD off by ${error} of the largest entry`);
  });
  // the update itself (p - p0), not just the parameter it is small against
  const delta = (p: Float32Array) => p.map((x, i) => x - p0[i]);
  const error = maxRelError(delta(results[1][0]), delta(results[0][0]));
  assert(error < 1e-4, `update: SIMD off by ${error} of the largest`);
});
