// OLMoE's clip_qkv (q, k and v clamped to [-c, c] after the q/k norms, before RoPE): no
// fixture has it on, so the forward is checked against an independent float64 OLMoE
// forward written here from transformers' modeling_olmoe.py, which first reproduces the
// HF golden logits of olmoe-a; the backward against finite differences whose steps cross
// no clamp bound.

import assert from "node:assert";
import type { Backend } from "../lib/backend/backend.ts";
import { CpuBackend, type CpuWeight, topKIndices } from "../lib/backend/cpu.ts";
import { SafetensorsFile, toFloat32, toInt32 } from "../lib/io/safetensors.ts";
import { type MlpSpec, routerName } from "../lib/model/config.ts";
import { type BatchShape, forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import { lossAndGrad } from "../lib/train/backward.ts";
import { FIXTURE_ROOT } from "./golden.ts";
import { decoderLoss, pinnedLoss, pinTopK, trainingBatch, zeroGrads } from "./train_fd.ts";
import { webgpuForTests } from "./webgpu_helper.ts";

type Moe = Extract<MlpSpec, { kind: "moe" }>;
const OLMOE = `${FIXTURE_ROOT}olmoe-a`;

/** Fractions of q, k and v entries the clamp changed in a reference forward. */
interface Clipped {
  q: number;
  k: number;
  v: number;
}

/**
 * OLMoE's forward in float64 from the model's weights and spec (modeling_olmoe.py of
 * transformers v4.45.1): RMSNorm, q/k/v projections, q_norm/k_norm over the whole
 * projection, clamp to +-clip_qkv, RoPE (rotate_half), causal GQA softmax attention,
 * o_proj, router softmax and top-k (renormalised if norm_topk_prob), SwiGLU experts,
 * final norm, lm head. Returns the logits [batch * seqLen, vocab] and the clipped shares.
 */
async function referenceForward(model: Model, ids: Int32Array, shape: BatchShape) {
  const s = model.spec, H = s.hidden, D = s.headDim, n = ids.length;
  const w = async (name: string): Promise<Float64Array> =>
    Float64Array.from(toFloat32(await model.rawTensor(name)));
  /** x [rows, in] @ W[out, in]^T */
  const linear = (x: Float64Array, wt: Float64Array, out: number) => {
    const inDim = wt.length / out, rows = x.length / inDim, y = new Float64Array(rows * out);
    for (let r = 0; r < rows; r++) {
      for (let o = 0; o < out; o++) {
        let acc = 0;
        for (let i = 0; i < inDim; i++) acc += x[r * inDim + i] * wt[o * inDim + i];
        y[r * out + o] = acc;
      }
    }
    return y;
  };
  const rmsNorm = (x: Float64Array, g: Float64Array) => {
    const cols = g.length, y = new Float64Array(x.length);
    for (let r = 0; r < x.length / cols; r++) {
      let ss = 0;
      for (let c = 0; c < cols; c++) ss += x[r * cols + c] ** 2;
      const inv = 1 / Math.sqrt(ss / cols + s.eps);
      for (let c = 0; c < cols; c++) y[r * cols + c] = x[r * cols + c] * inv * g[c];
    }
    return y;
  };
  const clipped: Clipped = { q: 0, k: 0, v: 0 };
  const clamp = (x: Float64Array, which: keyof Clipped): Float64Array => {
    if (s.clipQkv === null) return x;
    const c = s.clipQkv;
    let count = 0;
    const y = x.map((v) => (Math.abs(v) > c && count++, Math.min(c, Math.max(-c, v))));
    clipped[which] = Math.max(clipped[which], count / x.length);
    return y;
  };
  // rotate_half RoPE on [n, heads * D] at each token's position within its row
  const rope = (x: Float64Array, heads: number) => {
    const y = new Float64Array(x.length), half = D / 2;
    for (let t = 0; t < n; t++) {
      const pos = t % shape.seqLen;
      for (let h = 0; h < heads; h++) {
        const o = t * heads * D + h * D;
        for (let i = 0; i < D; i++) {
          const f = pos / s.ropeTheta ** ((2 * (i % half)) / D);
          const rot = i < half ? -x[o + i + half] : x[o + i - half];
          y[o + i] = x[o + i] * Math.cos(f) + rot * Math.sin(f);
        }
      }
    }
    return y;
  };
  const silu = (v: number) => v / (1 + Math.exp(-v));
  const embed = await w("model.embed_tokens.weight");
  let h = new Float64Array(n * H);
  for (let t = 0; t < n; t++) h.set(embed.subarray(ids[t] * H, (ids[t] + 1) * H), t * H);
  for (let l = 0; l < s.numLayers; l++) {
    const p = `model.layers.${l}.`, a = `${p}self_attn.`;
    const xn = rmsNorm(h, await w(`${p}input_layernorm.weight`));
    let q: Float64Array = linear(xn, await w(`${a}q_proj.weight`), s.heads * D);
    let k: Float64Array = linear(xn, await w(`${a}k_proj.weight`), s.kvHeads * D);
    let v: Float64Array = linear(xn, await w(`${a}v_proj.weight`), s.kvHeads * D);
    if (s.qkNorm) {
      q = rmsNorm(q, await w(`${a}q_norm.weight`));
      k = rmsNorm(k, await w(`${a}k_norm.weight`));
    }
    q = rope(clamp(q, "q"), s.heads), k = rope(clamp(k, "k"), s.kvHeads), v = clamp(v, "v");
    const att = new Float64Array(n * s.heads * D), group = s.heads / s.kvHeads;
    for (let b = 0; b < shape.batch; b++) {
      for (let hd = 0; hd < s.heads; hd++) {
        const kvh = Math.floor(hd / group);
        for (let i = 0; i < shape.seqLen; i++) {
          const ti = b * shape.seqLen + i, scores = new Float64Array(i + 1);
          for (let j = 0; j <= i; j++) {
            const tj = b * shape.seqLen + j;
            let dot = 0;
            for (let d = 0; d < D; d++) {
              dot += q[ti * s.heads * D + hd * D + d] * k[tj * s.kvHeads * D + kvh * D + d];
            }
            scores[j] = dot / Math.sqrt(D);
          }
          const m = Math.max(...scores);
          const e = scores.map((x) => Math.exp(x - m)), z = e.reduce((x, y) => x + y, 0);
          for (let j = 0; j <= i; j++) {
            const tj = b * shape.seqLen + j;
            for (let d = 0; d < D; d++) {
              att[ti * s.heads * D + hd * D + d] += (e[j] / z) *
                v[tj * s.kvHeads * D + kvh * D + d];
            }
          }
        }
      }
    }
    const o = linear(att, await w(`${a}o_proj.weight`), H);
    h = h.map((x, i) => x + o[i]);
    const mlp = s.layers[l].mlp as Moe;
    const x2 = rmsNorm(h, await w(`${p}post_attention_layernorm.weight`));
    const logits = linear(x2, await w(routerName(s, l)), mlp.experts);
    const out = new Float64Array(n * H);
    for (let t = 0; t < n; t++) {
      const lg = logits.subarray(t * mlp.experts, (t + 1) * mlp.experts);
      const m = Math.max(...lg), e = lg.map((x) => Math.exp(x - m));
      const z = e.reduce((x, y) => x + y, 0), prob = e.map((x) => x / z);
      const top = topKIndices(prob, mlp.topK);
      const sum = top.reduce((acc, i) => acc + prob[i], 0);
      const x = x2.subarray(t * H, (t + 1) * H);
      for (const ex of top) {
        const wt = mlp.renorm.normalize ? prob[ex] / sum : prob[ex];
        const ep = `${p}mlp.experts.${ex}.`;
        const g = linear(x, await w(`${ep}gate_proj.weight`), mlp.expertWidth);
        const u = linear(x, await w(`${ep}up_proj.weight`), mlp.expertWidth);
        const y = linear(g.map((gv, i) => silu(gv) * u[i]), await w(`${ep}down_proj.weight`), H);
        for (let c = 0; c < H; c++) out[t * H + c] += wt * y[c];
      }
    }
    h = h.map((x, i) => x + out[i]);
  }
  const hn = rmsNorm(h, await w("model.norm.weight"));
  const head = await w(s.tieEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  return { logits: linear(hn, head, s.vocab), clipped };
}

function relMaxDiff(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let maxAbs = 0, maxDiff = 0;
  for (let i = 0; i < want.length; i++) {
    maxAbs = Math.max(maxAbs, Math.abs(want[i]));
    maxDiff = Math.max(maxDiff, Math.abs(got[i] - want[i]));
  }
  return maxDiff / maxAbs;
}

const CLIP = 1.2;

/**
 * olmoe-a with clip_qkv = CLIP. Its v entries are ~0.2 (no norm after v_proj), so the
 * projections are scaled by 8 to put some of them past the bound too (and q and k when
 * there are no q/k norms; the norms undo the scale).
 */
async function clippedOlmoe(be: Backend, qkNorm = true): Promise<Model> {
  const model = await Model.load(OLMOE, be);
  model.spec.clipQkv = CLIP;
  model.spec.qkNorm = qkNorm;
  for (let l = 0; l < model.spec.numLayers; l++) {
    for (const proj of ["q_proj", "k_proj", "v_proj"]) {
      const raw = await model.rawTensor(`model.layers.${l}.self_attn.${proj}.weight`);
      const v = toFloat32(raw).map((x) => x * 8);
      model.putTensor({ ...raw, dtype: "F32", bytes: new Uint8Array(v.buffer) });
    }
  }
  return model;
}

async function goldenBatch() {
  const golden = await SafetensorsFile.open(`${OLMOE}/golden.safetensors`);
  const raw = await golden.read("input_ids");
  const [batch, seqLen] = raw.shape;
  const want = toFloat32(await golden.read("logits"));
  return { ids: toInt32(raw), shape: { batch, seqLen }, want };
}

Deno.test("clip_qkv: the float64 reference reproduces olmoe-a's HF golden logits", async () => {
  const { ids, shape, want } = await goldenBatch();
  const model = await Model.load(OLMOE, new CpuBackend());
  const { logits } = await referenceForward(model, ids, shape);
  model.close();
  const err = relMaxDiff(logits, want);
  console.log(`  reference vs golden: ${err.toExponential(2)}`);
  assert(err < 1e-5, `reference vs golden: ${err}`);
});

const gpu = await webgpuForTests();
const BACKENDS: [string, () => Backend][] = [
  ["cpu", () => new CpuBackend()],
  ["cpu-reference", () => new CpuBackend({ reference: true })],
  ...(gpu ? [["webgpu", () => gpu] as [string, () => Backend]] : []),
];

// qkNorm off runs the stacked projection's path, which clamps q|k|v in one op before the
// fused split and RoPE (no architecture clips without q/k norms yet; the path exists).
for (const qkNorm of [true, false]) {
  Deno.test(`clip_qkv: forward with clipping active matches the float64 reference${qkNorm ? "" : " (no q/k norm)"}`, async () => {
    const { ids, shape } = await goldenBatch();
    for (const [name, make] of BACKENDS) {
      const model = await clippedOlmoe(make(), qkNorm);
      const want = await referenceForward(model, ids, shape);
      const c = want.clipped;
      assert(c.q > 0.05 && c.k > 0.05 && c.v > 0.02, `too little clipped: ${JSON.stringify(c)}`);
      const got = await forward(model, ids, shape);
      // the same model without the clamp is far off: the check sees it
      model.spec.clipQkv = null;
      const unclipped = await forward(model, ids, shape);
      model.close();
      const err = relMaxDiff(got.logits, want.logits);
      const off = relMaxDiff(unclipped.logits, want.logits);
      console.log(
        `  ${name}: clipped q ${c.q.toFixed(3)} k ${c.k.toFixed(3)} v ${c.v.toFixed(3)}; ` +
          `vs reference ${err.toExponential(2)} (unclipped ${off.toExponential(2)})`,
      );
      assert(err < 1e-5, `${name}: ${err}`);
      assert(off > 1e-2, `${name}: clipping changes the logits by ${off} only`);
    }
  });
}

/**
 * Watches the backend's clamp: after `pin()`, `crossed` is set when a clamp call puts an
 * entry on the other side of a bound than the call of the pinned forward did.
 */
function watchClamp(be: Backend) {
  const own = be.clamp;
  const sides: Int8Array[] = [];
  let pinned = false, call = 0;
  const watch = {
    crossed: false,
    clippedShare: 0,
    pin: () => void (pinned = true),
    start: () => void ((call = 0), (watch.crossed = false)),
    unwatch: () => void (be.clamp = own),
  };
  be.clamp = (x, limit) => {
    const out = own.call(be, x, limit);
    const xs = (x as unknown as { data: Float32Array }).data; // CPU tensors
    const side = Int8Array.from(xs, (v) => (v > limit ? 1 : v < -limit ? -1 : 0));
    if (!pinned) {
      sides.push(side);
      watch.clippedShare = Math.max(watch.clippedShare, side.filter((v) => v).length / side.length);
    } else if (side.some((v, i) => v !== sides[call][i])) watch.crossed = true;
    call++;
    return out;
  };
  return watch;
}

for (const qkNorm of [true, false]) {
  Deno.test(`clip_qkv: gradients vs FD with steps that cross no clamp bound${qkNorm ? "" : " (no q/k norm)"}`, async () => {
    // The plain loops (f64 sums): their loss is the least noisy for small steps.
    const be = new CpuBackend({ reference: true });
    const model = await clippedOlmoe(be, qkNorm);
    const names = [
      "model.layers.0.self_attn.q_proj.weight",
      "model.layers.0.self_attn.k_proj.weight",
      "model.layers.1.self_attn.v_proj.weight",
      "model.layers.0.self_attn.q_norm.weight",
      "model.layers.1.self_attn.k_norm.weight",
      "model.layers.0.input_layernorm.weight",
    ].filter((n) => qkNorm || !n.includes("_norm."));
    for (const n of names) model.makeTrainable(n);
    const batch = trainingBatch(model.spec.vocab), { ids, targets, shape } = batch;
    const grads = await zeroGrads(model, names);
    const { loss } = await lossAndGrad(model, ids, targets, shape, grads);
    const pins = pinTopK(be), clamps = watchClamp(be);
    const base = await decoderLoss(model, ids, targets, shape);
    pins.pin(), clamps.pin();
    assert(Math.abs(loss - base.loss) < 1e-5, `training loss ${loss} != decoder ${base.loss}`);
    assert(clamps.clippedShare > 0.05, `clipped ${clamps.clippedShare}`);
    const steps = [1e-2, 2.5e-3, 6e-4, 1.5e-4];
    let worst = 0;
    for (const n of names) {
      const data = (await model.weight(n) as CpuWeight).data;
      const g = await be.read(grads.get(n)!);
      const order = Array.from(g.keys()).sort((a, b) => Math.abs(g[b]) - Math.abs(g[a]));
      const entries = [...order.slice(0, 10), order[Math.floor(order.length / 2)], 0];
      let gmax = 0, err = 0, used = 0;
      for (const v of g) gmax = Math.max(gmax, Math.abs(v));
      for (const i of entries) {
        // the largest step whose +-h moves no clamp input across a bound
        for (const h of steps) {
          const orig = data[i];
          const at = async (x: number) => {
            data[i] = x;
            clamps.start();
            const l = await pinnedLoss(model, batch, pins);
            return { l, x: data[i], crossed: clamps.crossed };
          };
          const up = await at(orig + h), down = await at(orig - h);
          data[i] = orig;
          if (up.crossed || down.crossed) continue;
          const e = Math.abs((up.l - down.l) / (up.x - down.x) - g[i]) / gmax;
          if (Deno.env.get("CLIP_FD_VERBOSE")) console.log(`    ${i} h ${h} g ${g[i]} err ${e}`);
          err = Math.max(err, e);
          used++;
          break;
        }
      }
      worst = Math.max(worst, err);
      console.log(`  ${n}: FD error ${err.toExponential(2)} over ${used} of ${entries.length}`);
      assert(used >= entries.length - 2, `${n}: ${used} of ${entries.length} entries usable`);
      assert(err < 1e-2, `${n}: FD error ${err}`);
    }
    clamps.unwatch(), pins.unpin();
    model.close();
    console.log(`  worst ${worst.toExponential(2)}`);
  });
}
