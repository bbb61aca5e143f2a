// Every WebGPU backward op against the CPU reference backward (plain loops) on fresh random
// inputs: sizes that are not multiples of the tiles, every weight dtype, accumulation
// (calling twice adds), and a backend with a tiny binding limit so weights, gradients and
// activations go through the chunked paths. Ends with one whole training step (loss,
// gradients, AdamW update) of a tiny model on both backends.

import assert from "node:assert";
import {
  type AttentionShape,
  numelOf,
  type Tensor,
  type TrainingBackend,
  type WeightDType,
} from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { MATMUL_BACKWARD_KERNELS, WebGpuBackend } from "../lib/backend/webgpu/mod.ts";
import { Model } from "../lib/model/model.ts";
import { type Grads, lossAndGrad } from "../lib/train/backward.ts";
import { type Condensed, condensedCheckpoint } from "./train_fd.ts";
import {
  rawWeight,
  relError as sharedRelError,
  seededInputs,
  webgpuForTests,
} from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;
const cpu = new CpuBackend({ reference: true }); // the oracle: plain loops, no BLAS
// 4 KiB bindings: a [40, 64] f32 gradient becomes 4 bands, a [300, 64] bf16 weight 10 chunks.
const SMALL_BINDING = 4096;
const chunked = gpu?.withMaxBindingBytes(SMALL_BINDING);
const backends = (): WebGpuBackend[] => [gpu!, chunked!];

// Worst error seen per op, printed at the end for the report.
const maxErrors = new Map<string, number>();

const { randn, randInts, distinctRows } = seededInputs(0x1234567);

const relError = (op: string, got: Float32Array, want: Float32Array) =>
  sharedRelError(maxErrors, op, got, want);

async function expectClose(op: string, got: Tensor, want: Tensor, tol: number) {
  assert.deepEqual([...got.shape], [...want.shape], `${op}: shape`);
  expectArrays(op, await gpu!.read(got), await cpu.read(want), tol);
}

function expectArrays(op: string, got: Float32Array, want: Float32Array, tol: number) {
  const err = relError(op, got, want);
  assert(err <= tol, `${op}: relative error ${err} > ${tol}`);
}

/** The same f32 data as a tensor on both backends. */
function both(be: TrainingBackend, data: Float32Array, shape: number[]): [Tensor, Tensor] {
  return [be.tensor(data, shape), cpu.tensor(data.slice(), shape)];
}

// f32 sums of up to a few hundred terms (GPU, f32) against the CPU's double sums: the
// observed errors are ~1e-7; 1e-5 of the largest entry still catches any wrong term.
const SUM_TOL = 1e-5;
// One or two roundings per entry.
const ELEMENTWISE_TOL = 1e-6;

// ---- matmul backward ----------------------------------------------------------------

async function checkMatmulBackward(
  be: WebGpuBackend,
  n: number,
  k: number,
  m: number,
  dtype: WeightDType,
  trainable = false,
) {
  const raw = rawWeight("w", [m, k], randn(m * k), dtype);
  const gw = trainable ? be.uploadTrainableWeight(raw) : be.uploadWeight(raw);
  const cw = trainable ? cpu.uploadTrainableWeight(raw) : cpu.uploadWeight(raw);
  const [gx, cx] = both(be, randn(n * k), [n, k]);
  // gradients start non-zero: the op must add, not overwrite
  const [gwg, cwg] = both(be, randn(m * k), [m, k]);
  const [gbg, cbg] = both(be, randn(m), [m]);
  const tag = `${dtype}${trainable ? " trainable" : ""}`;
  for (let call = 0; call < 2; call++) {
    const [gdy, cdy] = both(be, randn(n * m), [n, m]);
    const opts = (wg: Tensor, bg: Tensor) => ({ needInput: true, weightGrad: wg, biasGrad: bg });
    const gdx = be.matmulBackward(gx, gw, gdy, opts(gwg, gbg))!;
    const cdx = cpu.matmulBackward(cx, cw, cdy, opts(cwg, cbg))!;
    await expectClose(`matmulBackward dx ${tag}`, gdx, cdx, SUM_TOL);
    be.free(gdx), be.free(gdy);
  }
  await expectClose("matmulBackward dW (+=, twice)", gwg, cwg, SUM_TOL);
  await expectClose("matmulBackward dBias (+=, twice)", gbg, cbg, SUM_TOL);
  // needInput false: no dx, weight gradient only
  const [gdy, cdy] = both(be, randn(n * m), [n, m]);
  assert.equal(be.matmulBackward(gx, gw, gdy, { needInput: false, weightGrad: gwg }), null);
  cpu.matmulBackward(cx, cw, cdy, { needInput: false, weightGrad: cwg });
  await expectClose("matmulBackward dW (+=, twice)", gwg, cwg, SUM_TOL);
  for (const x of [gx, gwg, gbg, gdy]) be.free(x);
  be.freeWeight(gw);
}

// [n, k, m]: ragged against the 16-wide tiles and the blocked kernels' 128-wide ones (the
// last two span two and three of them, with partial reduction tiles). The blocked kernels
// take 64-row tiles up to 64 output rows (n for dx, m for dW): [64, 130, 64] fills one.
const MATMUL_SIZES: [number, number, number][] = [
  [1, 5, 3],
  [7, 63, 65],
  [33, 129, 3],
  [16, 16, 16],
  [50, 17, 1],
  [64, 130, 64],
  [130, 257, 129],
  [129, 40, 300],
];

for (const kernel of MATMUL_BACKWARD_KERNELS) {
  for (const dtype of ["F32", "F16", "BF16"] as const) {
    Deno.test({
      name: `webgpu matmulBackward "${kernel}" ${dtype}: dx, dW += and dBias += match cpu ` +
        `for ragged sizes`,
      ignore,
      async fn() {
        const be = gpu!.withOptions({ matmulBackwardKernel: kernel });
        for (const [n, k, m] of MATMUL_SIZES) await checkMatmulBackward(be, n, k, m, dtype);
      },
    });
  }
}

for (const kernel of MATMUL_BACKWARD_KERNELS) {
  Deno.test({
    name: `webgpu matmulBackward "${kernel}" with chunked weights, gradients and ` +
      `activations; trainable`,
    ignore,
    fn: () => checkChunkedMatmulBackward(kernel),
  });
}

async function checkChunkedMatmulBackward(kernel: (typeof MATMUL_BACKWARD_KERNELS)[number]) {
  const whole = gpu!.withOptions({ matmulBackwardKernel: kernel });
  const be = whole.withMaxBindingBytes(SMALL_BINDING);
  // [65, 129] bf16 (15 rows a chunk), dW [65, 129] f32 in bands of 7 rows, x [33, 129]
  // and dy [33, 65] in row ranges.
  await checkMatmulBackward(be, 33, 129, 65, "BF16");
  await checkMatmulBackward(be, 7, 63, 33, "F16");
  await checkMatmulBackward(be, 40, 64, 20, "F32");
  // A trainable (f32 master) weight from a bf16 checkpoint tensor, chunked and not.
  await checkMatmulBackward(be, 9, 64, 40, "BF16", true);
  await checkMatmulBackward(whole, 9, 64, 40, "BF16", true);
  // The split really happened: [40, 64] f32 in 3 weight chunks (16 rows of 256 B) x 1
  // dx range (dx [9, 64] fits), dW [40, 64] in 3 bands (15 rows, as the bands are bound
  // from aligned offsets) x 1 range, 1 bias pass.
  const w = be.uploadWeight(rawWeight("w", [40, 64], randn(40 * 64), "F32"));
  const x = be.tensor(randn(9 * 64), [9, 64]), dy = be.tensor(randn(9 * 40), [9, 40]);
  const wg = be.tensor(new Float32Array(40 * 64), [40, 64]);
  const bg = be.tensor(new Float32Array(40), [40]);
  const before = be.dispatches;
  be.free(be.matmulBackward(x, w, dy, { needInput: true, weightGrad: wg, biasGrad: bg })!);
  assert.equal(be.dispatches - before, 3 + 3 + 1);
  for (const t of [x, dy, wg, bg]) be.free(t);
  be.freeWeight(w);
}

// ---- norm, elementwise, rope ----------------------------------------------------------

Deno.test({
  name: "webgpu rmsNormBackward matches cpu (dx and weight grad +=) for every dtype",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const dtype of ["F32", "F16", "BF16"] as const) {
        for (const [n, d] of [[1, 5], [7, 300], [40, 64], [3, 900]]) {
          const raw = rawWeight("norm", [d], randn(d, 2), dtype);
          const gw = be.uploadWeight(raw), cw = cpu.uploadWeight(raw);
          const [gx, cx] = both(be, randn(n * d, 3), [n, d]);
          const [gwg, cwg] = both(be, randn(d), [d]);
          for (let call = 0; call < 2; call++) {
            const [gdy, cdy] = both(be, randn(n * d), [n, d]);
            await expectClose(
              `rmsNormBackward dx ${dtype}`,
              be.rmsNormBackward(gx, gw, gdy, 1e-6, gwg),
              cpu.rmsNormBackward(cx, cw, cdy, 1e-6, cwg),
              SUM_TOL,
            );
          }
          await expectClose("rmsNormBackward dw (+=, twice)", gwg, cwg, SUM_TOL);
          be.freeWeight(gw);
        }
      }
    }
  },
});

Deno.test({
  name: "webgpu swiglu, clamp, sigmoidScaleRows backward match cpu",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const [n, d] of [[1, 1], [5, 77], [40, 70]]) {
        const [gg, cg] = both(be, randn(n * d, 6), [n, d]);
        const [gu, cu] = both(be, randn(n * d, 2), [n, d]);
        const [gdy, cdy] = both(be, randn(n * d), [n, d]);
        const gs = be.swigluBackward(gg, gu, gdy), cs = cpu.swigluBackward(cg, cu, cdy);
        await expectClose("swigluBackward dGate", gs.dGate, cs.dGate, ELEMENTWISE_TOL * 4);
        await expectClose("swigluBackward dUp", gs.dUp, cs.dUp, ELEMENTWISE_TOL * 4);
        await expectClose(
          "clampBackward",
          be.clampBackward(gg, gdy, 2.5),
          cpu.clampBackward(cg, cdy, 2.5),
          0,
        );
        const [gate, cgate] = both(be, randn(n, 4), [n, 1]);
        const gb = be.sigmoidScaleRowsBackward(gu, gate, gdy);
        const cb = cpu.sigmoidScaleRowsBackward(cu, cgate, cdy);
        await expectClose("sigmoidScaleRowsBackward dy", gb.dy, cb.dy, ELEMENTWISE_TOL * 4);
        await expectClose("sigmoidScaleRowsBackward dg", gb.dg, cb.dg, SUM_TOL);
      }
    }
  },
});

Deno.test({
  name: "webgpu ropeBackward matches cpu (linear scaling, large positions)",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const [n, heads, hd] of [[3, 2, 4], [37, 3, 10]]) {
        const positions = randInts(n, 5000);
        const [gdy, cdy] = both(be, randn(n * heads * hd), [n, heads * hd]);
        await expectClose(
          "ropeBackward",
          be.ropeBackward(gdy, positions, heads, hd, 10000, 2),
          cpu.ropeBackward(cdy, positions, heads, hd, 10000, 2),
          ELEMENTWISE_TOL * 4,
        );
      }
    }
  },
});

// ---- attention ------------------------------------------------------------------------

const ATTENTION_SHAPES: AttentionShape[] = [
  { batch: 2, qLen: 5, kvLen: 5, heads: 4, kvHeads: 2, headDim: 8, window: null }, // GQA
  { batch: 1, qLen: 9, kvLen: 9, heads: 3, kvHeads: 1, headDim: 6, window: 4 }, // MQA, window
  { batch: 3, qLen: 4, kvLen: 11, heads: 2, kvHeads: 2, headDim: 5, window: null }, // prefix
  { batch: 2, qLen: 3, kvLen: 13, heads: 4, kvHeads: 2, headDim: 7, window: 5 }, // both
  { batch: 2, qLen: 40, kvLen: 40, heads: 2, kvHeads: 1, headDim: 8, window: 17 },
];

Deno.test({
  name: "webgpu attentionBackward matches cpu: GQA, windows, kvLen > qLen, chunked batches",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const s of ATTENTION_SHAPES) {
        const qn = s.batch * s.qLen * s.heads * s.headDim;
        const kn = s.batch * s.kvLen * s.kvHeads * s.headDim;
        const [gq, cq] = both(be, randn(qn, 2), [s.batch * s.qLen, s.heads * s.headDim]);
        const [gk, ck] = both(be, randn(kn, 2), [s.batch * s.kvLen, s.kvHeads * s.headDim]);
        const [gv, cv] = both(be, randn(kn), [s.batch * s.kvLen, s.kvHeads * s.headDim]);
        const [gdo, cdo] = both(be, randn(qn), [s.batch * s.qLen, s.heads * s.headDim]);
        const g = be.attentionBackward(gq, gk, gv, gdo, s);
        const c = cpu.attentionBackward(cq, ck, cv, cdo, s);
        const tag = `window ${s.window}, ${s.heads}/${s.kvHeads} heads`;
        await expectClose(`attentionBackward dq`, g.dq, c.dq, SUM_TOL);
        await expectClose(`attentionBackward dk`, g.dk, c.dk, SUM_TOL);
        await expectClose(`attentionBackward dv`, g.dv, c.dv, SUM_TOL);
        for (const t of [gq, gk, gv, gdo, g.dq, g.dk, g.dv]) be.free(t);
        void tag;
      }
    }
  },
});

// ---- embedding, MoE routing and dispatch --------------------------------------------

Deno.test({
  name: "webgpu embeddingBackward accumulates repeated ids like cpu (chunked table grad)",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const [vocab, h, count] of [[300, 64, 50], [11, 7, 30], [5, 3, 1]]) {
        const ids = randInts(count, Math.min(vocab, 20)); // plenty of repeats
        const [gtg, ctg] = both(be, randn(vocab * h), [vocab, h]);
        for (let call = 0; call < 2; call++) {
          const [gdy, cdy] = both(be, randn(count * h), [count, h]);
          be.embeddingBackward(ids, gdy, gtg);
          cpu.embeddingBackward(ids, cdy, ctg);
        }
        await expectClose("embeddingBackward (+=, twice)", gtg, ctg, ELEMENTWISE_TOL);
      }
    }
  },
});

Deno.test({
  name: "webgpu scatterAddRowsBackward and routeTopKBackward match cpu",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const [n, h, count] of [[20, 64, 7], [50, 33, 50], [3, 5, 1]]) {
        const rows = distinctRows(count, n);
        const scales = randn(count);
        const [gdo, cdo] = both(be, randn(n * h), [n, h]);
        const [gy, cy] = both(be, randn(count * h), [count, h]);
        const g = be.scatterAddRowsBackward(gdo, gy, rows, scales);
        const c = cpu.scatterAddRowsBackward(cdo, cy, rows, scales);
        await expectClose("scatterAddRowsBackward dy", g.dy, c.dy, ELEMENTWISE_TOL);
        await expectClose("scatterAddRowsBackward dScales", g.dScales, c.dScales, SUM_TOL);
      }
      for (const [n, e, k] of [[1, 4, 2], [37, 60, 6], [9, 8, 8]]) {
        for (const normalize of [false, true]) {
          const [gl, cl] = both(be, randn(n * e, 3), [n, e]);
          const routing = await cpu.routeTopK(cl, k, normalize, 1e-20);
          const dw = randn(n * k);
          await expectClose(
            `routeTopKBackward normalize=${normalize}`,
            be.routeTopKBackward(gl, routing, dw, normalize, 1e-20),
            cpu.routeTopKBackward(cl, routing, dw, normalize, 1e-20),
            SUM_TOL,
          );
        }
      }
    }
  },
});

// ---- loss, optimizer, utilities --------------------------------------------------------

Deno.test({
  name: "webgpu crossEntropy matches cpu: ignore index, grad scale, large vocab, all ignored",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const [n, vocab] of [[1, 3], [9, 900], [30, 77]]) {
        const targets = randInts(n, vocab);
        for (let i = 0; i < n; i += 3) targets[i] = -100;
        if (n === 1) targets[0] = 2;
        const [gl, cl] = both(be, randn(n * vocab, 8), [n, vocab]);
        for (const scale of [undefined, 0.125]) {
          const g = await be.crossEntropy(gl, targets, -100, scale);
          const c = await cpu.crossEntropy(cl, targets, -100, scale);
          assert.equal(g.count, c.count);
          // Each row's loss is log(sum) + max - logit[target] in f32: a difference of
          // numbers of size ~max |logit| (8 here), so the error is absolute, ~ulp(8) = 1e-6,
          // however small the loss.
          const lossErr = Math.abs(g.loss - c.loss) / Math.max(1, Math.abs(c.loss));
          maxErrors.set(
            "crossEntropy loss (abs)",
            Math.max(maxErrors.get("crossEntropy loss (abs)") ?? 0, lossErr),
          );
          assert(lossErr <= 2e-6, `crossEntropy loss ${g.loss} vs ${c.loss}`);
          await expectClose("crossEntropy dLogits", g.dLogits, c.dLogits, ELEMENTWISE_TOL * 4);
        }
      }
      // every row ignored: loss 0, count 0, zero gradient
      const [gl, cl] = both(be, randn(12), [3, 4]);
      const g = await be.crossEntropy(gl, new Int32Array([7, 7, 7]), 7);
      const c = await cpu.crossEntropy(cl, new Int32Array([7, 7, 7]), 7);
      assert.deepEqual([g.loss, g.count], [0, 0]);
      await expectClose("crossEntropy dLogits", g.dLogits, c.dLogits, 0);
      await assert.rejects(be.crossEntropy(gl, new Int32Array([0, 4, 1]), -100), /out of range/);
    }
  },
});

Deno.test({
  name: "webgpu AdamW: several steps equal cpu on chunked trainable weights (params, m, v)",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const [shape, dtype] of [[[40, 64], "BF16"], [[77], "F32"], [[3, 5], "F16"]] as const) {
        const numel = shape.reduce((a, b) => a * b, 1);
        const raw = rawWeight("p", [...shape], randn(numel), dtype);
        const gp = be.uploadTrainableWeight(raw), cp = cpu.uploadTrainableWeight(raw);
        assert.equal(gp.dtype, "F32");
        expectArrays("readWeight", await be.readWeight(gp), await cpu.readWeight(cp), 0);
        const zeros = new Float32Array(numel);
        const [gm, cm] = both(be, zeros, [...shape]), [gv, cv] = both(be, zeros, [...shape]);
        for (let step = 1; step <= 5; step++) {
          const [gg, cg] = both(be, randn(numel, 0.1), [...shape]);
          const hyper = {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weightDecay: 0.1,
            step,
            gradScale: 0.5,
          };
          be.adamwStep(gp, gg, gm, gv, hyper);
          cpu.adamwStep(cp, cg, cm, cv, hyper);
          be.free(gg);
        }
        // f32 arithmetic on both sides, different association: a few ulps of the update
        expectArrays("adamw param", await be.readWeight(gp), await cpu.readWeight(cp), 1e-6);
        await expectClose("adamw m", gm, cm, 1e-6);
        await expectClose("adamw v", gv, cv, 1e-6);
        be.freeWeight(gp);
      }
    }
  },
});

Deno.test({
  name: "webgpu zero, addInPlace, sumSquares, readWeight of frozen weights",
  ignore,
  async fn() {
    for (const be of backends()) {
      for (const n of [1, 1000, 9000]) {
        const [ga, ca] = both(be, randn(n), [n]);
        const [gb, cb] = both(be, randn(n), [n]);
        be.addInPlace(ga, gb), cpu.addInPlace(ca, cb);
        await expectClose("addInPlace", ga, ca, 0);
        // Both tensors (in several binding ranges each with 4 KiB bindings), one read.
        const submits = be.submits;
        const ss = await be.sumSquares([ga, gb]), want = await cpu.sumSquares([ca, cb]);
        assert.equal(be.submits - submits, 1, "sumSquares: one submit");
        const err = Math.abs(ss - want) / want;
        maxErrors.set("sumSquares", Math.max(maxErrors.get("sumSquares") ?? 0, err));
        assert(err <= SUM_TOL, `sumSquares ${ss} vs ${want}`);
        be.zero(ga);
        assert.deepEqual(await be.read(ga), new Float32Array(n));
      }
      assert.equal(await be.sumSquares([]), 0);
      for (const dtype of ["F32", "F16", "BF16"] as const) {
        const raw = rawWeight("w", [33, 63], randn(33 * 63), dtype);
        const gw = be.uploadWeight(raw);
        expectArrays(
          `readWeight ${dtype}`,
          await be.readWeight(gw),
          await cpu.readWeight(cpu.uploadWeight(raw)),
          0,
        );
        be.freeWeight(gw);
      }
    }
  },
});

// ---- one whole training step ----------------------------------------------------------

// The trainable tensors of each fixture cover every block backward: embedding, attention
// projections (with biases on Qwen2-MoE), q/k norms (OLMoE's whole-projection, Qwen3-MoE's
// per-head), norms, router, routed and
// shared experts, the sigmoid-gated shared expert, the lm head.
// The last one leaves every routed expert frozen (CD-MoE fine-tuning's case): the MoE
// layers run them grouped from their stacks, forward, recomputed and backward.
const TRAINING_STEPS: { fixture: string; names: string[]; recompute: boolean; label?: string }[] = [
  {
    fixture: "deepseek-bf16",
    names: [
      "model.embed_tokens.weight",
      "model.layers.0.self_attn.q_proj.weight",
      "model.layers.1.mlp.gate.weight",
      "model.layers.1.mlp.experts.0.down_proj.weight",
      "model.layers.1.mlp.shared_experts.up_proj.weight",
      "model.layers.1.post_attention_layernorm.weight",
      "model.norm.weight",
      "lm_head.weight",
    ],
    recompute: false,
  },
  {
    fixture: "olmoe-bf16",
    names: [
      "model.layers.0.self_attn.q_norm.weight",
      "model.layers.1.self_attn.k_norm.weight",
      "model.layers.1.self_attn.v_proj.weight",
      "model.layers.1.mlp.experts.3.gate_proj.weight",
      "model.layers.1.mlp.gate.weight",
    ],
    recompute: false,
  },
  {
    fixture: "qwen3_moe-a",
    names: [
      "model.layers.0.self_attn.q_norm.weight",
      "model.layers.2.self_attn.k_norm.weight",
      "model.layers.1.self_attn.q_proj.weight",
      "model.layers.3.self_attn.k_proj.weight",
      "model.layers.2.mlp.experts.5.down_proj.weight",
      "model.layers.0.mlp.gate.weight",
    ],
    recompute: true,
  },
  {
    fixture: "qwen2_moe-bf16",
    names: [
      "model.layers.0.self_attn.q_proj.bias",
      "model.layers.0.self_attn.k_proj.weight",
      "model.layers.1.mlp.shared_expert_gate.weight",
      "model.layers.1.mlp.shared_expert.down_proj.weight",
      "model.layers.1.mlp.experts.2.up_proj.weight",
      "model.layers.1.input_layernorm.weight",
    ],
    recompute: true,
  },
  {
    fixture: "deepseek-bf16",
    names: [
      "model.layers.0.self_attn.q_proj.weight",
      "model.layers.1.input_layernorm.weight",
      "model.layers.1.mlp.gate.weight",
      "model.layers.1.mlp.shared_experts.up_proj.weight",
    ],
    recompute: true,
    label: " (routed experts frozen)",
  },
];

const STEP_LR = 1e-3;

/** Loss, gradients and the weights after one AdamW step, read to the host. */
async function trainingStep(
  be: TrainingBackend,
  fixture: string,
  names: string[],
  recompute: boolean,
) {
  const dir = fixture.startsWith("/") // a checkpoint's path, or a fixture's name
    ? fixture
    : new URL(`./fixtures/hf-golden/${fixture}`, import.meta.url).pathname;
  const model = await Model.load(dir, be);
  for (const n of names) model.makeTrainable(n);
  const v = model.spec.vocab;
  const ids = Int32Array.from({ length: 14 }, (_, i) => (i * 37 + 11) % v);
  const targets = Int32Array.from(ids, (_, i) => (i % 7 === 6 ? -100 : ids[i + 1]));
  const grads: Grads = new Map();
  for (const n of names) {
    const w = await model.weight(n);
    grads.set(n, be.tensor(new Float32Array(numelOf(w.shape)), w.shape));
  }
  const shape = { batch: 2, seqLen: 7 };
  const submits = be instanceof WebGpuBackend ? be.submits : 0;
  const { loss } = await lossAndGrad(model, ids, targets, shape, grads, { recompute });
  if (be instanceof WebGpuBackend) {
    // Waits on the device: a MoE layer reads its routing (again when recompute reruns the
    // forward) and, together, its experts' routing-weight gradients; then the loss. Not
    // one read per expert or per tensor.
    const moeLayers = model.spec.layers.filter((l) => l.mlp.kind === "moe").length;
    const most = (recompute ? 3 : 2) * moeLayers + 1;
    assert(be.submits - submits <= most, `${be.submits - submits} submits, over ${most}`);
  }
  const g = new Map<string, Float32Array>(), p = new Map<string, Float32Array>();
  for (const n of names) {
    const w = await model.weight(n);
    g.set(n, (await be.read(grads.get(n)!)).slice());
    // (CPU tensors wrap their array: m and v get one each)
    const m = be.tensor(new Float32Array(numelOf(w.shape)), w.shape);
    const vv = be.tensor(new Float32Array(numelOf(w.shape)), w.shape);
    const hyper = { lr: STEP_LR, beta1: 0.9, beta2: 0.999, eps: 1e-3, weightDecay: 0.01 };
    be.adamwStep(w, grads.get(n)!, m, vv, { ...hyper, step: 1, gradScale: 1 });
    p.set(n, (await be.readWeight(w)).slice());
    for (const t of [m, vv, grads.get(n)!]) be.free(t);
  }
  model.close();
  return { loss, g, p };
}

async function compareTrainingStep(fixture: string, names: string[], recompute: boolean) {
  const c = await trainingStep(cpu, fixture, names, recompute);
  const w = await trainingStep(gpu!, fixture, names, recompute);
  const lossErr = Math.abs(c.loss - w.loss) / Math.abs(c.loss);
  maxErrors.set(
    "training step loss",
    Math.max(maxErrors.get("training step loss") ?? 0, lossErr),
  );
  assert(lossErr <= 1e-5, `loss ${w.loss} vs ${c.loss}`);
  for (const n of names) {
    // Every op chained through the model in f32 (GPU) vs doubles (CPU): ~2e-6 seen.
    expectArrays(`training step grad`, w.g.get(n)!, c.g.get(n)!, 1e-5);
    // Adam's first step moves an entry by lr * g / (|g| + eps). With the usual eps
    // (1e-8) entries with |g| near eps amplify the f32 gradient noise without bound,
    // so the step uses eps = 1e-3 (gradients here are ~1e-5..1e-2): the step stays
    // well conditioned and a wrong update (sign, tensor, decay) is off by ~lr.
    const [gp, cp] = [w.p.get(n)!, c.p.get(n)!];
    let diff = 0;
    for (let i = 0; i < cp.length; i++) diff = Math.max(diff, Math.abs(gp[i] - cp[i]));
    const steps = diff / STEP_LR;
    maxErrors.set(
      "training step param (|diff| / lr)",
      Math.max(maxErrors.get("training step param (|diff| / lr)") ?? 0, steps),
    );
    assert(steps <= 1e-3, `${n}: the updated weights differ by ${steps} lr`);
  }
}

for (const { fixture, names, recompute, label } of TRAINING_STEPS) {
  Deno.test({
    name: `webgpu training step on ${fixture}${
      label ?? ""
    } equals cpu: loss, gradients, AdamW update`,
    ignore,
    fn: () => compareTrainingStep(fixture, names, recompute),
  });
}

// Condensed checkpoints as condense.ts writes them, trained as finetune.ts's default: the
// dense MLP (shared + kept experts, wbar folded), on Qwen with the sigmoid-gated shared
// expert beside it (layer 0) and alone (layer 1, no expert kept).
const CONDENSED_STEPS: { fixture: string; kept: Condensed; names: string[] }[] = [
  {
    fixture: "qwen2_moe-bf16",
    kept: [[0, [2, 5], [0.3, 0.2]], [1, [], []]],
    names: [
      "model.layers.0.mlp.gate_proj.weight",
      "model.layers.0.mlp.up_proj.weight",
      "model.layers.0.mlp.down_proj.weight",
      "model.layers.0.mlp.shared_expert.up_proj.weight",
      "model.layers.0.mlp.shared_expert_gate.weight",
      "model.layers.1.mlp.shared_expert.down_proj.weight",
      "model.layers.1.mlp.shared_expert_gate.weight",
      "model.layers.0.self_attn.q_proj.bias",
    ],
  },
  {
    fixture: "deepseek-bf16",
    kept: [[1, [3, 6], [0.4, 0.25]]],
    names: [
      "model.layers.1.mlp.gate_proj.weight",
      "model.layers.1.mlp.up_proj.weight",
      "model.layers.1.mlp.down_proj.weight",
      "model.layers.0.self_attn.q_proj.weight",
    ],
  },
];
for (const { fixture, kept, names } of CONDENSED_STEPS) {
  Deno.test({
    name:
      `webgpu training step on a condensed ${fixture} equals cpu: loss, gradients, AdamW update`,
    ignore,
    async fn() {
      const dir = await condensedCheckpoint(
        new URL(`./fixtures/hf-golden/${fixture}`, import.meta.url).pathname,
        kept,
      );
      for (const recompute of [false, true]) await compareTrainingStep(dir, names, recompute);
      await Deno.remove(dir.slice(0, dir.lastIndexOf("/")), { recursive: true });
    },
  });
}

Deno.test({
  name: "webgpu backward worst errors per op (report)",
  ignore,
  fn() {
    for (const [op, err] of [...maxErrors].sort()) console.log(`  ${op}: ${err.toExponential(2)}`);
  },
});
