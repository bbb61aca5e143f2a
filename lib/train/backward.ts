// Hand-written backward through the decoder (llm.c style): a training forward that
// mirrors lib/model/decoder.ts op for op while keeping what the backward needs in a
// per-layer tape, and one backward function per block that chains the backend's
// backward ops. Only trainable tensors (model.trainable) get a gradient; frozen ones
// are skipped, and the backward stops below the lowest layer that holds a trainable
// tensor. With `recompute`, only each layer's input is kept during the forward and the
// layer is re-run (bit-identically: same ops, same routing) just before its backward.

import {
  expertPlan,
  type Routing,
  type Tensor,
  type TrainingBackend,
  type Weight,
} from "../backend/backend.ts";
import { type CeRouting, cesSlots } from "../model/compressed_experts.ts";
import {
  cesName,
  cesWidth,
  denseName,
  expertName,
  layerPrefix,
  type MlpNames,
  mlpNames,
  type MoeSpec,
  routerName,
  sharedGateName,
  sharedName,
} from "../model/config.ts";
import {
  type BatchShape,
  dispatchCompressedExperts,
  groupByExpert,
  positionsFor,
  qkNorm,
  qkNormShape,
  type ScaledExpertValues,
  scaledTensors,
} from "../model/decoder.ts";
import type { Model } from "../model/model.ts";

/** Gradients of the trainable tensors, f32, by tensor name (accumulated across micro-batches). */
export type Grads = Map<string, Tensor>;

interface SwigluTape {
  x: Tensor; // [N, H] input (owned by the caller's tape, not freed here)
  g: Tensor; // [N, W] gate projection
  u: Tensor; // [N, W] up projection
  a: Tensor; // [N, W] silu(g) * u
  y: Tensor; // [N, H] down projection
  names: MlpNames;
}

interface AttentionTape {
  xn: Tensor; // [N, H] input_layernorm(h)
  q0: Tensor; // [N, heads*hd] q_proj output
  k0: Tensor; // [N, kvHeads*hd]
  v0: Tensor;
  qn?: Tensor; // q_norm / k_norm outputs (OLMoE, Qwen3-MoE)
  kn?: Tensor;
  q: Tensor; // after RoPE: attention inputs
  k: Tensor;
  v: Tensor; // after clamp
  a: Tensor; // [N, heads*hd] attention output, o_proj input
  stats: Tensor | null; // what the backward reuses (Backend.attentionSaving)
}

interface ExpertTape {
  expert: number;
  rows: Int32Array; // token rows routed to this expert
  slots: Int32Array; // index into routing.indices/weights for each row
  scales: Float32Array;
  mlp: SwigluTape;
}

/**
 * A layer's frozen routed experts run grouped from their stacks, as the decoder runs them:
 * the plan, the gate|up product [R, 2W] (interleaved runs) and the outputs y [R, H].
 */
interface GroupedTape {
  plan: ReturnType<typeof expertPlan>;
  gateUp: Tensor;
  y: Tensor;
}

/** A compressed-experts main expert: down(silu(gate(x*t0)) * up(x*t2) * t1). */
interface CeTape {
  split: CeRouting;
  experts: ScaledExpertValues[];
  t0: Tensor; // [N, H] theta0 and theta2 of each token
  t2: Tensor;
  alpha: Tensor; // [N, E] each token's aux alphas (0 elsewhere)
}

interface MlpTape {
  xn: Tensor; // [N, H] post_attention_layernorm(x)
  dense?: SwigluTape;
  shared?: SwigluTape;
  sharedGate?: { g: Tensor; y: Tensor }; // gate logit [N, 1] and the gated output [N, H]
  logits?: Tensor; // [N, E] router logits
  routing?: Routing;
  experts?: ExpertTape[];
  grouped?: GroupedTape;
  ce?: CeTape;
}

interface LayerTape {
  h: Tensor; // [N, H] layer input (residual stream)
  attn?: AttentionTape;
  x: Tensor; // [N, H] residual after attention (h itself when there is no attention)
  mlp?: MlpTape;
}

async function w(model: Model, name: string): Promise<Weight> {
  return await model.weight(name);
}

const postNormName = (l: number) => `${layerPrefix(l)}post_attention_layernorm.weight`;

function be(model: Model): TrainingBackend {
  return model.backend as TrainingBackend;
}

async function swigluForward(
  model: Model,
  x: Tensor,
  names: MlpNames,
): Promise<SwigluTape> {
  const b = be(model);
  const g = b.matmul(x, await w(model, names.gate));
  const u = b.matmul(x, await w(model, names.up));
  const a = b.swiglu(g, u);
  const y = b.matmul(a, await w(model, names.down));
  return { x, g, u, a, y, names };
}

/** Backward of down(silu(gate x) * up x): returns dx [N, H]; frees the tape's g, u, a. */
async function swigluBackward(
  model: Model,
  t: SwigluTape,
  dy: Tensor,
  grads: Grads,
): Promise<Tensor> {
  const b = be(model);
  const { gate, up, down } = t.names;
  const da = b.matmulBackward(t.a, await w(model, down), dy, {
    needInput: true,
    weightGrad: grads.get(down),
  })!;
  const { dGate, dUp } = b.swigluBackward(t.g, t.u, da);
  b.free(da);
  const dx = b.matmulBackward(t.x, await w(model, gate), dGate, {
    needInput: true,
    weightGrad: grads.get(gate),
  })!;
  const dx2 = b.matmulBackward(t.x, await w(model, up), dUp, {
    needInput: true,
    weightGrad: grads.get(up),
  })!;
  b.addInPlace(dx, dx2);
  b.free(dx2), b.free(dGate), b.free(dUp), b.free(t.g), b.free(t.u), b.free(t.a);
  return dx;
}

async function attentionForward(
  model: Model,
  l: number,
  h: Tensor,
  shape: BatchShape,
): Promise<AttentionTape> {
  const b = be(model), s = model.spec, p = `${layerPrefix(l)}self_attn.`;
  const bias = async (name: string, on: boolean) =>
    on ? await w(model, `${p}${name}.bias`) : undefined;
  const xn = b.rmsNorm(h, await w(model, `${layerPrefix(l)}input_layernorm.weight`), s.eps);
  const q0 = b.matmul(xn, await w(model, `${p}q_proj.weight`), await bias("q_proj", s.qkvBias));
  const k0 = b.matmul(xn, await w(model, `${p}k_proj.weight`), await bias("k_proj", s.qkvBias));
  const v0 = b.matmul(xn, await w(model, `${p}v_proj.weight`), await bias("v_proj", s.qkvBias));
  const t: AttentionTape = { xn, q0, k0, v0 } as AttentionTape;
  let q = q0, k = k0, v = v0;
  if (s.qkNorm) {
    q = t.qn = await qkNorm(model, l, q0, "q");
    k = t.kn = await qkNorm(model, l, k0, "k");
  }
  if (s.clipQkv !== null) q = b.clamp(q, s.clipQkv), k = b.clamp(k, s.clipQkv);
  if (s.clipQkv !== null) v = b.clamp(v0, s.clipQkv);
  const pos = positionsFor(shape);
  const qr = b.rope(q, pos, s.heads, s.headDim, s.ropeTheta, s.ropeLinearFactor);
  const kr = b.rope(k, pos, s.kvHeads, s.headDim, s.ropeTheta, s.ropeLinearFactor);
  if (s.clipQkv !== null) b.free(q), b.free(k);
  t.q = qr, t.k = kr, t.v = v;
  const { out, stats } = b.attentionSaving(qr, kr, v, attentionShape(model, l, shape));
  t.a = out, t.stats = stats;
  return t;
}

function attentionShape(model: Model, l: number, shape: BatchShape) {
  const s = model.spec;
  return {
    batch: shape.batch,
    qLen: shape.seqLen,
    kvLen: shape.seqLen,
    heads: s.heads,
    kvHeads: s.kvHeads,
    headDim: s.headDim,
    window: s.layers[l].window,
  };
}

/** Backward of the attention block (from dOut of o_proj) down to dh; frees the tape. */
async function attentionBackward(
  model: Model,
  l: number,
  h: Tensor,
  t: AttentionTape,
  dOut: Tensor,
  shape: BatchShape,
  grads: Grads,
): Promise<Tensor> {
  const b = be(model), s = model.spec, p = `${layerPrefix(l)}self_attn.`;
  const proj = (name: string) => `${p}${name}.weight`;
  const biasGrad = (name: string, on: boolean) => on ? grads.get(`${p}${name}.bias`) : undefined;
  const da = b.matmulBackward(t.a, await w(model, proj("o_proj")), dOut, {
    needInput: true,
    weightGrad: grads.get(proj("o_proj")),
    biasGrad: biasGrad("o_proj", s.oBias),
  })!;
  const saved = { out: t.a, stats: t.stats };
  const { dq, dk, dv } = b.attentionBackward(
    t.q,
    t.k,
    t.v,
    da,
    attentionShape(model, l, shape),
    saved,
  );
  b.free(da);
  const pos = positionsFor(shape);
  let gq = b.ropeBackward(dq, pos, s.heads, s.headDim, s.ropeTheta, s.ropeLinearFactor);
  let gk = b.ropeBackward(dk, pos, s.kvHeads, s.headDim, s.ropeTheta, s.ropeLinearFactor);
  let gv = dv;
  b.free(dq), b.free(dk);
  const replace = (old: Tensor, next: Tensor) => (b.free(old), next);
  if (s.clipQkv !== null) {
    // the clamp inputs: q/k after their norm (if any), v straight from v_proj
    gq = replace(gq, b.clampBackward(t.qn ?? t.q0, gq, s.clipQkv));
    gk = replace(gk, b.clampBackward(t.kn ?? t.k0, gk, s.clipQkv));
    gv = replace(gv, b.clampBackward(t.v0, gv, s.clipQkv));
  }
  if (s.qkNorm) {
    // Over the rows the forward normalised (per head for Qwen3-MoE), then back to q's shape.
    const normBackward = async (x: Tensor, dy: Tensor, which: "q" | "k") => {
      const name = `${p}${which}_norm.weight`, rows = qkNormShape(s, x);
      const dx = b.rmsNormBackward(
        b.reshape(x, rows),
        await w(model, name),
        b.reshape(dy, rows),
        s.eps,
        grads.get(name),
      );
      return b.reshape(dx, x.shape);
    };
    gq = replace(gq, await normBackward(t.q0, gq, "q"));
    gk = replace(gk, await normBackward(t.k0, gk, "k"));
  }
  let dxn: Tensor | null = null;
  for (const [name, g] of [["q_proj", gq], ["k_proj", gk], ["v_proj", gv]] as const) {
    const dx = b.matmulBackward(t.xn, await w(model, proj(name)), g, {
      needInput: true,
      weightGrad: grads.get(proj(name)),
      biasGrad: biasGrad(name, s.qkvBias),
    })!;
    if (dxn) b.addInPlace(dxn, dx), b.free(dx);
    else dxn = dx;
    b.free(g);
  }
  const ln = `${layerPrefix(l)}input_layernorm.weight`;
  const dh = b.rmsNormBackward(h, await w(model, ln), dxn!, s.eps, grads.get(ln));
  b.free(dxn!);
  for (const x of [t.xn, t.q0, t.k0, t.v0, t.qn, t.kn, t.q, t.k, t.a, t.stats]) if (x) b.free(x);
  if (t.v !== t.v0) b.free(t.v);
  return dh;
}

/**
 * The MLP block of layer l on x (residual after attention; `normed` its
 * post_attention_layernorm when the caller fused that with the residual add); returns the
 * tape and output.
 */
async function mlpForward(
  model: Model,
  l: number,
  x: Tensor,
  normed?: Tensor,
): Promise<[MlpTape, Tensor]> {
  const b = be(model), s = model.spec, mlp = s.layers[l].mlp;
  const xn = normed ?? b.rmsNorm(x, await w(model, postNormName(l)), s.eps);
  const t: MlpTape = { xn };
  const gatedShared = async (): Promise<Tensor> => {
    t.shared = await swigluForward(model, xn, mlpNames((p) => sharedName(s, l, p)));
    const g = b.matmul(xn, await w(model, sharedGateName(l))); // [N, 1]
    const y = b.sigmoidScaleRows(t.shared.y, g);
    t.sharedGate = { g, y };
    return y;
  };
  if (mlp.kind === "dense") {
    if (mlp.width === 0 && mlp.gatedShared) return [t, b.scale(await gatedShared(), 1)];
    t.dense = await swigluForward(model, xn, mlpNames((p) => denseName(l, p)));
    if (!mlp.gatedShared) return [t, b.scale(t.dense.y, 1)];
    return [t, b.add(t.dense.y, await gatedShared())];
  }
  if (mlp.kind !== "moe") throw new Error(`layer ${l}: no MLP to run`);
  t.logits = b.matmul(xn, await w(model, routerName(s, l)));
  const ce = mlp.mainExperts !== undefined;
  t.routing = ce // compressed experts split the raw top-k probabilities themselves
    ? await b.routeTopK(t.logits, mlp.topK, false, 0)
    : await b.routeTopK(t.logits, mlp.topK, mlp.renorm.normalize, mlp.renorm.eps);
  let out: Tensor;
  if (mlp.sharedWidth > 0 && mlp.sharedGate) out = b.scale(await gatedShared(), 1);
  else if (mlp.sharedWidth > 0) {
    t.shared = await swigluForward(model, xn, mlpNames((p) => sharedName(s, l, p)));
    out = b.scale(t.shared.y, 1);
  } else {
    out = b.tensor(new Float32Array(xn.shape[0] * s.hidden), [xn.shape[0], s.hidden]);
  }
  if (ce) {
    const experts: ScaledExpertValues[] = [];
    const { split, t0, t2, alpha } = await dispatchCompressedExperts(
      model,
      l,
      mlp,
      xn,
      t.routing,
      out,
      experts,
    );
    t.ce = { split, experts, t0: t0!, t2: t2!, alpha: alpha! };
    return [t, out];
  }
  if (model.expertsStackable(l)) {
    t.grouped = await groupedExpertsForward(model, l, mlp, xn, t.routing, out);
    return [t, out];
  }
  t.experts = [];
  const groups = groupByExpert(t.routing, mlp.topK, mlp.experts);
  for (let e = 0; e < mlp.experts; e++) {
    const rows = groups.rows[e], slots = groups.slots[e], scales = groups.scales[e];
    if (slots.length === 0) continue;
    const xe = b.gatherRows(xn, rows);
    const tape = await swigluForward(model, xe, mlpNames((p) => expertName(s, l, e, p)));
    b.scatterAddRows(out, tape.y, rows, scales);
    t.experts.push({ expert: e, rows, slots, scales, mlp: tape });
  }
  return [t, out];
}

/**
 * Frozen routed experts on their tokens from the stacks (gather, gate|up, SwiGLU, down,
 * combine: the decoder's routedExperts in separate ops), added into out; a few dispatches
 * a layer where one by one takes six an expert.
 */
async function groupedExpertsForward(
  model: Model,
  l: number,
  mlp: MoeSpec,
  xn: Tensor,
  routing: Routing,
  out: Tensor,
): Promise<GroupedTape> {
  const b = be(model);
  const plan = expertPlan(routing, mlp.topK, mlp.experts);
  const xe = b.gatherRows(xn, plan.order);
  const gateUp = b.groupedMatmul(
    xe,
    await model.expertStack(l, "gate_up", mlp.experts),
    plan.groupRows,
  );
  b.free(xe);
  const a = b.swigluGateUp(gateUp);
  const y = b.groupedMatmul(a, await model.expertStack(l, "down", mlp.experts), plan.groupRows);
  b.free(a);
  b.combineRows(out, y, plan.sources, plan.scales, mlp.topK);
  return { plan, gateUp, y };
}

/**
 * Backward of groupedExpertsForward from dOut: adds each token's input gradient into dxn
 * and writes the routing-weight gradients into dWeights [N, k]; frees the grouped tape.
 */
async function groupedExpertsBackward(
  model: Model,
  l: number,
  mlp: MoeSpec,
  t: MlpTape,
  dOut: Tensor,
  dxn: Tensor,
  dWeights: Float32Array,
): Promise<void> {
  const b = be(model), { plan, gateUp, y } = t.grouped!;
  // combineRows backward: grouped row i took weight rowScales[i] of token order[i]
  const { dy, dScales } = b.scatterAddRowsBackward(dOut, y, plan.order, plan.rowScales);
  b.free(y);
  const da = b.groupedMatmulBackward(
    dy,
    await model.expertStack(l, "down", mlp.experts),
    plan.groupRows,
  );
  b.free(dy);
  const dGateUp = b.swigluGateUpBackward(gateUp, da);
  b.free(da), b.free(gateUp);
  const gateUpStack = await model.expertStack(l, "gate_up", mlp.experts);
  const dxe = b.groupedMatmulBackward(dGateUp, gateUpStack, plan.groupRows);
  b.free(dGateUp);
  // gatherRows backward: each token sums its k rows' gradients, in the forward's order
  b.combineRows(dxn, dxe, plan.sources, new Float32Array(plan.sources.length).fill(1), mlp.topK);
  b.free(dxe);
  const ds = await b.read(dScales);
  for (let i = 0; i < ds.length; i++) dWeights[plan.slots[i]] = ds[i];
  t.grouped = undefined;
}

/** Backward of the MLP block from dOut down to dx (through post_attention_layernorm); frees the tape. */
async function mlpBackward(
  model: Model,
  l: number,
  x: Tensor,
  t: MlpTape,
  dOut: Tensor,
  grads: Grads,
): Promise<Tensor> {
  const b = be(model), s = model.spec, mlp = s.layers[l].mlp;
  const dxn = b.tensor(new Float32Array(x.shape[0] * s.hidden), [x.shape[0], s.hidden]);
  const addFree = (d: Tensor) => (b.addInPlace(dxn, d), b.free(d));
  const plain = async (tape: SwigluTape, dy: Tensor) => {
    addFree(await swigluBackward(model, tape, dy, grads));
    b.free(tape.y);
  };
  if (t.dense) await plain(t.dense, dOut);
  if (t.shared && t.sharedGate) {
    const { dy, dg } = b.sigmoidScaleRowsBackward(t.shared.y, t.sharedGate.g, dOut);
    const gate = sharedGateName(l);
    addFree(
      b.matmulBackward(t.xn, await w(model, gate), dg, {
        needInput: true,
        weightGrad: grads.get(gate),
      })!,
    );
    await plain(t.shared, dy);
    b.free(dy), b.free(dg), b.free(t.sharedGate.g), b.free(t.sharedGate.y);
  } else if (t.shared) {
    await plain(t.shared, dOut);
  }
  if (t.ce && mlp.kind === "moe") {
    const dxnCe = await ceBackward(model, l, mlp, t, dOut, grads);
    addFree(dxnCe);
  }
  if ((t.experts || t.grouped) && mlp.kind === "moe") {
    const dWeights = new Float32Array(t.routing!.weights.length); // [N, k]
    if (t.grouped) await groupedExpertsBackward(model, l, mlp, t, dOut, dxn, dWeights);
    else {
      const ones = new Float32Array(x.shape[0]).fill(1);
      const dScales: Tensor[] = [];
      for (const e of t.experts!) {
        const { dy, dScales: ds } = b.scatterAddRowsBackward(dOut, e.mlp.y, e.rows, e.scales);
        dScales.push(ds);
        const dxe = await swigluBackward(model, e.mlp, dy, grads);
        b.scatterAddRows(dxn, dxe, e.rows, ones.subarray(0, e.rows.length)); // gatherRows backward
        b.free(dy), b.free(dxe), b.free(e.mlp.x), b.free(e.mlp.y);
      }
      (await b.readAll(dScales)).forEach((ds, i) => {
        const slots = t.experts![i].slots;
        for (let j = 0; j < slots.length; j++) dWeights[slots[j]] = ds[j];
        b.free(dScales[i]);
      });
    }
    // the router: gradient through the selected routing weights only
    const dLogits = b.routeTopKBackward(
      t.logits!,
      t.routing!,
      dWeights,
      mlp.renorm.normalize,
      mlp.renorm.eps,
    );
    const router = routerName(s, l);
    addFree(
      b.matmulBackward(t.xn, await w(model, router), dLogits, {
        needInput: true,
        weightGrad: grads.get(router),
      })!,
    );
    b.free(dLogits), b.free(t.logits!);
  }
  const ln = postNormName(l);
  const dx = b.rmsNormBackward(x, await w(model, ln), dxn, s.eps, grads.get(ln));
  b.free(dxn), b.free(t.xn);
  return dx;
}

/** One decoder layer with its tape; the output is a new tensor, the tape owns the rest. */
async function layerForward(
  model: Model,
  l: number,
  h: Tensor,
  shape: BatchShape,
): Promise<[LayerTape, Tensor]> {
  const b = be(model), layer = model.spec.layers[l];
  const tape: LayerTape = { h, x: h };
  let xn: Tensor | undefined;
  if (layer.attention) {
    tape.attn = await attentionForward(model, l, h, shape);
    const o = b.matmul(
      tape.attn.a,
      await w(model, `${layerPrefix(l)}self_attn.o_proj.weight`),
      model.spec.oBias ? await w(model, `${layerPrefix(l)}self_attn.o_proj.bias`) : undefined,
    );
    if (layer.mlp.kind === "none") tape.x = b.add(h, o);
    else {
      // The residual add and the MLP's norm in one pass, as the decoder does.
      const fused = b.addRmsNorm(h, o, await w(model, postNormName(l)), model.spec.eps);
      tape.x = fused.sum, xn = fused.normed;
    }
    b.free(o);
  }
  if (layer.mlp.kind === "none") return [tape, b.scale(tape.x, 1)];
  const [mlpTape, y] = await mlpForward(model, l, tape.x, xn);
  tape.mlp = mlpTape;
  const out = b.add(tape.x, y);
  b.free(y);
  return [tape, out];
}

/** Backward of one layer from dOut (gradient of its output) to dh; frees the tape except h. */
async function layerBackward(
  model: Model,
  l: number,
  tape: LayerTape,
  dOut: Tensor,
  shape: BatchShape,
  grads: Grads,
): Promise<Tensor> {
  const b = be(model);
  // residual: dx = dOut + mlp path
  const dx = b.scale(dOut, 1);
  if (tape.mlp) {
    const d = await mlpBackward(model, l, tape.x, tape.mlp, dOut, grads);
    b.addInPlace(dx, d), b.free(d);
  }
  if (tape.attn) {
    const d = await attentionBackward(model, l, tape.h, tape.attn, dx, shape, grads);
    b.addInPlace(dx, d), b.free(d);
    b.free(tape.x);
  }
  return dx;
}

export interface LossResult {
  /** Mean cross-entropy over the counted targets of this micro-batch. */
  loss: number;
  count: number;
}

/**
 * Forward and backward of one micro-batch: ids [batch*seqLen], targets (same shape,
 * ignoreIndex = not counted). Gradients are accumulated into `grads` (only the names it
 * holds are computed) with dLogits scaled by gradScale (1 / counted tokens of the whole
 * accumulated batch gives its mean). With `recompute`, layers are re-run in the backward.
 */
export async function lossAndGrad(
  model: Model,
  ids: Int32Array,
  targets: Int32Array,
  shape: BatchShape,
  grads: Grads,
  opts: { gradScale?: number; recompute?: boolean; ignoreIndex?: number } = {},
): Promise<LossResult> {
  const b = be(model), s = model.spec;
  const ignore = opts.ignoreIndex ?? -100;
  const lowest = lowestTrainableLayer(model, grads);
  const embedName = "model.embed_tokens.weight";
  const inputs: Tensor[] = []; // layer inputs
  const tapes: (LayerTape | null)[] = [];
  let h = b.embedding(await w(model, embedName), ids);
  for (let l = 0; l < s.numLayers; l++) {
    inputs.push(h);
    const [tape, out] = await layerForward(model, l, h, shape);
    if (opts.recompute || l < lowest) {
      freeTape(model, tape);
      tapes.push(null);
    } else tapes.push(tape);
    h = out;
  }
  const normW = await w(model, "model.norm.weight");
  const hn = b.rmsNorm(h, normW, s.eps);
  const head = await w(model, model.lmHeadName());
  const logits = b.matmul(hn, head); // [N, V]
  const ce = await b.crossEntropy(logits, targets, ignore, opts.gradScale);
  b.free(logits);
  // backward: lm head, final norm, layers from the top
  const dhn = b.matmulBackward(hn, head, ce.dLogits, {
    needInput: true,
    weightGrad: grads.get(model.lmHeadName()),
  })!;
  b.free(ce.dLogits);
  let dh = b.rmsNormBackward(h, normW, dhn, s.eps, grads.get("model.norm.weight"));
  b.free(dhn), b.free(hn), b.free(h);
  for (let l = s.numLayers - 1; l >= 0; l--) {
    if (l < lowest) break;
    let tape = tapes[l];
    if (!tape) {
      const [t, out] = await layerForward(model, l, inputs[l], shape); // recompute
      b.free(out);
      tape = t;
    }
    const next = await layerBackward(model, l, tape, dh, shape, grads);
    b.free(dh);
    dh = next;
  }
  const tableGrad = grads.get(embedName);
  if (tableGrad && lowest === 0) b.embeddingBackward(ids, dh, tableGrad);
  b.free(dh);
  for (const x of inputs) b.free(x);
  return { loss: ce.loss, count: ce.count };
}

/** The lowest layer the backward must reach: 0 when the embedding trains, numLayers when none. */
function lowestTrainableLayer(model: Model, grads: Grads): number {
  if (grads.has("model.embed_tokens.weight")) return 0;
  let lowest = model.spec.numLayers;
  for (const name of grads.keys()) {
    const m = /^model\.layers\.(\d+)\./.exec(name);
    if (m) lowest = Math.min(lowest, Number(m[1]));
  }
  return lowest;
}

function freeTape(model: Model, t: LayerTape): void {
  const b = be(model);
  const sw = (s?: SwigluTape) => {
    if (s) { for (const x of [s.g, s.u, s.a, s.y]) b.free(x); }
  };
  if (t.attn) {
    const a = t.attn;
    for (const x of [a.xn, a.q0, a.k0, a.v0, a.qn, a.kn, a.q, a.k, a.a, a.stats]) if (x) b.free(x);
    if (a.v !== a.v0) b.free(a.v);
    b.free(t.x);
  }
  if (t.mlp) {
    const m = t.mlp;
    sw(m.dense), sw(m.shared);
    if (m.sharedGate) b.free(m.sharedGate.g), b.free(m.sharedGate.y);
    if (m.logits) b.free(m.logits);
    for (const e of m.experts ?? []) sw(e.mlp), b.free(e.mlp.x);
    if (m.grouped) b.free(m.grouped.gateUp), b.free(m.grouped.y);
    for (const e of m.ce?.experts ?? []) freeCeExpert(model, e);
    if (m.ce) b.free(m.ce.t0), b.free(m.ce.t2), b.free(m.ce.alpha);
    b.free(m.xn);
  }
}

// ---- compressed experts (lib/model/compressed_experts.ts) ---------------------------
// The forward is the decoder's dispatchCompressedExperts, keeping each expert's values.

function freeCeExpert(model: Model, e: ScaledExpertValues): void {
  const b = be(model);
  for (const x of scaledTensors(e)) b.free(x);
}

/**
 * Backward of the CE routed part from dOut: returns dxn [N, H]; accumulates the expert
 * weight grads, the ces grad (through theta) and the router grad (through the main
 * weights w_m and the aux alphas). Frees the CE tape and the router logits.
 */
async function ceBackward(
  model: Model,
  l: number,
  mlp: MoeSpec,
  t: MlpTape,
  dOut: Tensor,
  grads: Grads,
): Promise<Tensor> {
  const b = be(model), s = model.spec, ce = t.ce!, split = ce.split;
  const n = dOut.shape[0], H = s.hidden, W = mlp.expertWidth, d = cesWidth(s, mlp);
  const k = mlp.topK, km = mlp.mainExperts!, ka = k - km;
  const zeros = (cols: number) => b.tensor(new Float32Array(n * cols), [n, cols]);
  // Gradients to the per-token xn * theta0, xn * theta2 and theta1, summed over main experts.
  const dXg = zeros(H), dXu = zeros(H), dT1 = zeros(W);
  const ones = new Float32Array(n * km).fill(1);
  const dScales: Tensor[] = [], slots: Int32Array[] = [];
  for (const e of ce.experts) {
    const { dy, dScales: ds } = b.scatterAddRowsBackward(dOut, e.y, e.rows, e.scales);
    dScales.push(ds), slots.push(e.slots);
    // The input gradient of one projection: grouped over the frozen stacks, or one
    // expert's matmul with its weight gradient.
    const inputGrad = async (x: Tensor, part: "gate" | "up" | "down", d: Tensor) => {
      if (e.grouped) {
        const stack = await model.expertStack(l, part, mlp.experts);
        return b.groupedMatmulBackward(d, stack, e.grouped.groupRows);
      }
      const name = expertName(s, l, e.expert, part);
      return b.matmulBackward(x, await w(model, name), d, {
        needInput: true,
        weightGrad: grads.get(name),
      })!;
    };
    // gatherRows backward: a grouped token sums its k_m rows (in the forward's order);
    // the rows of one expert are distinct.
    const gatherBackward = (dst: Tensor, d: Tensor) =>
      e.grouped
        ? b.combineRows(dst, d, e.grouped.sources, ones, km)
        : b.scatterAddRows(dst, d, e.rows, ones.subarray(0, e.rows.length));
    const das = await inputGrad(e.as, "down", dy);
    const da = b.mul(das, e.t1), dt1 = b.mul(das, e.a);
    const { dGate, dUp } = b.swigluBackward(e.g, e.u, da);
    const dxg = await inputGrad(e.xg, "gate", dGate);
    const dxu = await inputGrad(e.xu, "up", dUp);
    gatherBackward(dXg, dxg);
    gatherBackward(dXu, dxu);
    gatherBackward(dT1, dt1);
    for (const x of [dy, das, da, dt1, dGate, dUp, dxg, dxu]) b.free(x);
    freeCeExpert(model, e);
  }
  // xg = xn * theta0, xu = xn * theta2 per token: to xn and to the thetas.
  const dxn = b.mul(dXg, ce.t0), dxnUp = b.mul(dXu, ce.t2);
  b.addInPlace(dxn, dxnUp);
  const dT0 = b.mul(dXg, t.xn), dT2 = b.mul(dXu, t.xn);
  for (const x of [dxnUp, dXg, dXu, ce.t0, ce.t2]) b.free(x);
  // theta_v = alpha ces_v (alpha [N, E], ces_v [E, cols]; the forward's matmul by the slot
  // transposed, S_v = ces_v^T): dalpha = sum_v dtheta_v S_v and dces_v^T = dtheta_v^T alpha,
  // the input and weight gradients of that matmul, on the backend. Read back: [N, E] and
  // 3 x [cols, E], not 3 x [N, cols].
  const E = mlp.experts, cesGrad = grads.get(cesName(s, l));
  const dAlphaAll = b.tensor(new Float32Array(n * E), [n, E]);
  const dSlots: Tensor[] = [];
  const cesT = await cesSlots(model, l, mlp, false);
  [dT0, dT1, dT2].forEach((dTheta, v) => {
    const slot = cesT[v];
    const dSlot = cesGrad ? b.tensor(new Float32Array(slot.shape[0] * E), slot.shape) : undefined;
    const dAlpha = b.matmulBackward(ce.alpha, slot, dTheta, {
      needInput: true,
      weightGrad: dSlot,
    })!;
    b.addInPlace(dAlphaAll, dAlpha);
    b.free(dAlpha), b.free(dTheta);
    if (dSlot) dSlots.push(dSlot);
  });
  // One read for these and the main weights' gradients.
  const [dAlphas, ...rest] = await b.readAll([dAlphaAll, ...dSlots, ...dScales]);
  const dSlotValues = rest.slice(0, dSlots.length), dMainParts = rest.slice(dSlots.length);
  [dAlphaAll, ...dSlots].forEach((x) => b.free(x));
  const dMain = new Float32Array(n * km); // dL/dw_m
  dMainParts.forEach((ds, i) => {
    for (let j = 0; j < slots[i].length; j++) dMain[slots[i][j]] = ds[j];
    b.free(dScales[i]);
  });
  if (cesGrad) {
    const dces = new Float32Array(E * 3 * d); // [E, 3, d] from the transposed [cols, E]
    dSlotValues.forEach((dSlot, v) => {
      const cols = dSlot.length / E;
      for (let c = 0; c < cols; c++) {
        for (let e = 0; e < E; e++) dces[e * 3 * d + v * d + c] = dSlot[c * E + e];
      }
    });
    const tmp = b.tensor(dces, cesGrad.shape);
    b.addInPlace(cesGrad, tmp), b.free(tmp);
  }
  const dRaw = new Float32Array(n * k); // dL/dp over the sorted top-k (raw probabilities)
  for (let tok = 0; tok < n; tok++) {
    // alpha_j = p_j / S_aux: dp_j = (dalpha_j - sum_i alpha_i dalpha_i) / S_aux
    let mean = 0;
    for (let j = 0; j < ka; j++) {
      const at = tok * ka + j;
      mean += split.auxAlpha[at] * dAlphas[tok * E + split.auxIndices[at]];
    }
    // w_m = p_m / Z, Z = eps + the sum of p over the main or all top-k experts when
    // renormalising (else 1): dp_j = [j main] dw_j / Z - [j in Z's sum] sum_m w_m dw_m / Z
    let wdw = 0;
    for (let j = 0; j < km; j++) wdw += split.mainWeights[tok * km + j] * dMain[tok * km + j];
    const z = split.mainDivisor[tok], normalize = mlp.renorm.normalize;
    const auxInZ = normalize && mlp.renormOver !== "main" ? wdw / z : 0;
    const auxSum = split.auxSum[tok];
    for (let j = 0; j < ka; j++) {
      const dAlpha = dAlphas[tok * E + split.auxIndices[tok * ka + j]];
      dRaw[tok * k + km + j] = (auxSum > 0 ? (dAlpha - mean) / auxSum : 0) - auxInZ;
    }
    for (let j = 0; j < km; j++) {
      const dw = dMain[tok * km + j];
      dRaw[tok * k + j] = normalize ? (dw - wdw) / z : dw;
    }
  }
  const dLogits = b.routeTopKBackward(t.logits!, t.routing!, dRaw, false, 0);
  const router = routerName(s, l);
  const dxr = b.matmulBackward(t.xn, await w(model, router), dLogits, {
    needInput: true,
    weightGrad: grads.get(router),
  })!;
  b.addInPlace(dxn, dxr);
  for (const x of [dxr, dLogits, ce.alpha, t.logits!]) b.free(x);
  t.logits = undefined;
  return dxn;
}
