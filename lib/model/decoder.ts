// The one MoE decoder forward pass for every architecture (pre-norm blocks, RoPE,
// GQA attention, dense / MoE / condensed / dropped MLPs). Per-architecture behaviour
// comes from ModelSpec; nothing here branches on model_type.

import {
  expertPlan,
  GATE_UP_RUN,
  hasDeviceCompressedExperts,
  kvCacheRows,
  type KvRows,
  numelOf,
  type RopeSpec,
  type Routing,
  type Tensor,
  type Weight,
} from "../backend/backend.ts";
import { type CeRouting, cesSlots, splitRouting, thetaOf } from "./compressed_experts.ts";
import {
  denseName,
  expertName,
  layerPrefix,
  type MlpNames,
  mlpNames,
  type MlpSpec,
  type ModelSpec,
  type MoeSpec,
  routerName,
  sharedGateName,
  sharedName,
} from "./config.ts";
import type { Model } from "./model.ts";

/** Where a batch of equal-length sequences sits: rows are sequence-major (b * seqLen + t). */
export interface BatchShape {
  batch: number;
  seqLen: number;
}

/**
 * Observers and overrides. Tensors passed to observers are valid only during the call
 * (the decoder frees them afterwards): read them inside the callback if needed.
 */
export interface ForwardHooks {
  /** Replace layer l's MLP block: receives the post-attention-norm input, returns the block output. */
  mlpOverride?: (layer: number, xNorm: Tensor) => Promise<Tensor | undefined>;
  onRouter?: (layer: number, logits: Tensor, routing: Routing) => void | Promise<void>;
  /** Residual stream after layer l (HF hidden_states[l + 1] before the final norm). */
  onLayerOutput?: (layer: number, h: Tensor) => void | Promise<void>;
}

/**
 * Per-layer key/value cache for incremental decoding (see generate.ts). k[l], v[l] are
 * zero-initialised [batch * capacity, kvHeads * headDim] tensors (row b * capacity + t);
 * `length` positions are filled. runLayer writes the new rows; the caller advances `length`.
 */
export interface KvCache {
  batch: number;
  capacity: number;
  length: number;
  k: Tensor[];
  v: Tensor[];
}

export function positionsFor(shape: BatchShape, offset = 0): Int32Array {
  const pos = new Int32Array(shape.batch * shape.seqLen);
  for (let i = 0; i < pos.length; i++) pos[i] = offset + (i % shape.seqLen);
  return pos;
}

export async function embed(model: Model, ids: Int32Array | Tensor): Promise<Tensor> {
  return model.backend.embedding(await model.weight("model.embed_tokens.weight"), ids);
}

/**
 * A block's first norm carried across the layer boundary (runLayer's `fuse`): the norm of
 * a layer's output is computed with its last residual add, in one pass over the residual
 * stream, and handed to the next layer as its normed input.
 */
export interface FusedNorm {
  /** In: this layer's input already normed by its first norm (firstNormName); runLayer frees it. */
  normed?: Tensor;
  /** In: the norm weight to apply to this layer's output (the next layer's first norm). */
  next?: Weight;
  /** Out: that norm of the output, when the layer computed it. */
  outNormed?: Tensor;
}

/**
 * The first norm of layer l's input: input_layernorm, post_attention_layernorm for a block
 * without attention, none for a block that does nothing (BlockDrop).
 */
export function firstNormName(model: Model, l: number): string | null {
  const layer = model.spec.layers[l], p = layerPrefix(l);
  if (layer.attention) return `${p}input_layernorm.weight`;
  return layer.mlp.kind === "none" ? null : `${p}post_attention_layernorm.weight`;
}

/** The norm applied to layer l's output: the next layer's first norm, or the final norm. */
export async function nextNorm(model: Model, l: number): Promise<Weight | undefined> {
  const name = l + 1 < model.spec.numLayers ? firstNormName(model, l + 1) : "model.norm.weight";
  return name === null ? undefined : await model.weight(name);
}

/**
 * One decoder block: h + attn(norm(h)), then + mlp(norm(.)). Returns a new tensor; with
 * `fuse`, takes its normed input from there and leaves the next norm of its output there.
 */
export async function runLayer(
  model: Model,
  l: number,
  h: Tensor,
  shape: BatchShape,
  hooks: ForwardHooks = {},
  cache?: KvCache,
  fuse?: FusedNorm,
): Promise<Tensor> {
  const be = model.backend, layer = model.spec.layers[l], eps = model.spec.eps;
  const p = layerPrefix(l);
  const postNorm = `${p}post_attention_layernorm.weight`;
  let given = fuse?.normed; // this block's first norm of h, if the previous block made it
  // The block's last residual add, with the next norm when asked for.
  const residual = (a: Tensor, b: Tensor) => {
    if (!fuse?.next) return be.add(a, b);
    const fused = be.addRmsNorm(a, b, fuse.next, eps);
    fuse.outNormed = fused.normed;
    return fused.sum;
  };
  let x = h;
  let xn: Tensor | undefined; // the MLP's input, post_attention_layernorm(x)
  if (layer.attention) {
    const hn = given ?? be.rmsNorm(x, await model.weight(`${p}input_layernorm.weight`), eps);
    given = undefined;
    const attn = await attentionBlock(model, l, hn, shape, cache);
    be.free(hn);
    if (layer.mlp.kind === "none") x = residual(h, attn);
    else {
      // The residual add and the MLP's norm in one pass over the residual stream.
      const fused = be.addRmsNorm(h, attn, await model.weight(postNorm), eps);
      x = fused.sum, xn = fused.normed;
    }
    be.free(attn);
  }
  if (layer.mlp.kind !== "none") {
    xn ??= given ?? be.rmsNorm(x, await model.weight(postNorm), eps);
    given = undefined;
    const mlp = (await hooks.mlpOverride?.(l, xn)) ??
      (await mlpBlock(model, l, layer.mlp, xn, hooks));
    be.free(xn);
    const next = residual(x, mlp);
    be.free(mlp);
    if (x !== h) be.free(x);
    x = next;
  }
  if (given) be.free(given); // a block that does nothing
  // Dropped blocks must still hand back a tensor the caller may free.
  if (x === h) x = be.scale(h, 1);
  return x;
}

export async function attentionBlock(
  model: Model,
  l: number,
  xn: Tensor,
  shape: BatchShape,
  cache?: KvCache,
): Promise<Tensor> {
  const be = model.backend, s = model.spec, p = `${layerPrefix(l)}self_attn.`;
  const past = cache ? cache.length : 0;
  const rope = {
    positions: positionsFor(shape, past),
    theta: s.ropeTheta,
    linearFactor: s.ropeLinearFactor,
  };
  const kvLen = past + shape.seqLen;
  if (cache && kvLen > cache.capacity) {
    throw new Error(`KV cache full (${kvLen} > ${cache.capacity})`);
  }
  // With a cache, the new keys and values go into its rows (written there by the split
  // where it can), and attention reads each sequence's first kvLen of its capacity rows.
  const kvRows = cache &&
    { k: cache.k[l], v: cache.v[l], seqLen: shape.seqLen, capacity: cache.capacity, past };
  const { q, k, v } = await qkvProjections(model, l, xn, rope, kvRows);
  const attentionShape = {
    batch: shape.batch,
    qLen: shape.seqLen,
    kvLen,
    heads: s.heads,
    kvHeads: s.kvHeads,
    headDim: s.headDim,
    window: model.spec.layers[l].window,
  };
  let a: Tensor;
  if (kvRows) {
    if (k && v) {
      // Not written by the split (q/k norms, or a model without stacks): added into the
      // zeroed rows.
      const rows = kvCacheRows(kvRows, q.shape[0], s.kvHeads * s.headDim);
      const ones = new Float32Array(rows.length).fill(1);
      be.scatterAddRows(kvRows.k, k, rows, ones);
      be.scatterAddRows(kvRows.v, v, rows, ones);
    }
    a = be.attention(q, kvRows.k, kvRows.v, { ...attentionShape, kvStride: kvRows.capacity });
  } else a = be.attention(q, k!, v!, attentionShape);
  be.free(q);
  if (k) be.free(k);
  if (v) be.free(v);
  const oBias = s.oBias ? await model.weight(`${p}o_proj.bias`) : undefined;
  const out = be.matmul(a, await model.weight(`${p}o_proj.weight`), oBias);
  be.free(a);
  return out;
}

/**
 * Attention's q, k and v of layer l, normed (OLMoE, Qwen3-MoE), clipped (clip_qkv) and rotated as HF
 * does. Inference runs one matmul over the three projections stacked (Model.rowStack),
 * then splitQkv with RoPE fused in, unless q/k norms must come between the two; a model
 * in training (no stacks) runs the three weights. Given a cache, the fused split writes k
 * and v into its rows and returns them as null.
 */
async function qkvProjections(
  model: Model,
  l: number,
  xn: Tensor,
  rope: RopeSpec,
  cache?: KvRows,
): Promise<{ q: Tensor; k: Tensor | null; v: Tensor | null }> {
  const be = model.backend, s = model.spec, p = `${layerPrefix(l)}self_attn.`;
  const names = (suffix: string) =>
    ["q_proj", "k_proj", "v_proj"].map((proj) => `${p}${proj}.${suffix}`);
  const weights = names("weight"), biases = s.qkvBias ? names("bias") : [];
  const replace = (old: Tensor, next: Tensor) => (be.free(old), next);
  let q: Tensor, k: Tensor, v: Tensor, rotated = false;
  if (!model.stacking) {
    const project = async (i: number) =>
      be.matmul(
        xn,
        await model.weight(weights[i]),
        s.qkvBias ? await model.weight(biases[i]) : undefined,
      );
    [q, k, v] = [await project(0), await project(1), await project(2)];
  } else {
    const bias = biases.length ? await model.rowStack(`${p}<qkv bias>`, biases) : undefined;
    let qkv = be.matmul(xn, await model.rowStack(`${p}<qkv weight>`, weights), bias);
    // Without q/k norms, clip (HF: after the norms, before RoPE) all three at once.
    rotated = !s.qkNorm;
    if (rotated && s.clipQkv !== null) qkv = replace(qkv, be.clamp(qkv, s.clipQkv));
    if (rotated && cache) {
      q = be.splitQkvIntoCache(qkv, s.heads, s.kvHeads, s.headDim, rope, cache);
      be.free(qkv);
      return { q, k: null, v: null };
    }
    ({ q, k, v } = be.splitQkv(qkv, s.heads, s.kvHeads, s.headDim, rotated ? rope : null));
    be.free(qkv);
  }
  if (rotated) return { q, k, v };
  if (s.qkNorm) {
    q = replace(q, await qkNorm(model, l, q, "q"));
    k = replace(k, await qkNorm(model, l, k, "k"));
  }
  if (s.clipQkv !== null) {
    q = replace(q, be.clamp(q, s.clipQkv));
    k = replace(k, be.clamp(k, s.clipQkv));
    v = replace(v, be.clamp(v, s.clipQkv));
  }
  const { positions, theta, linearFactor } = rope;
  q = replace(q, be.rope(q, positions, s.heads, s.headDim, theta, linearFactor));
  k = replace(k, be.rope(k, positions, s.kvHeads, s.headDim, theta, linearFactor));
  return { q, k, v };
}

/**
 * The rows q_norm / k_norm normalise, for q or k [N, heads * headDim]: each row (OLMoE), or
 * with qkNormPerHead each head's headDim entries, [N * heads, headDim] (Qwen3-MoE: one
 * weight of headDim shared by the heads).
 */
export function qkNormShape(spec: ModelSpec, x: Tensor): readonly number[] {
  return spec.qkNormPerHead ? [numelOf(x.shape) / spec.headDim, spec.headDim] : x.shape;
}

/** Layer l's q_norm (`which` "q") or k_norm of x, a new tensor of x's shape. */
export async function qkNorm(
  model: Model,
  l: number,
  x: Tensor,
  which: "q" | "k",
): Promise<Tensor> {
  const be = model.backend, s = model.spec;
  const w = await model.weight(`${layerPrefix(l)}self_attn.${which}_norm.weight`);
  return be.reshape(be.rmsNorm(be.reshape(x, qkNormShape(s, x)), w, s.eps), x.shape);
}

/**
 * SwiGLU MLP down(silu(gate(x)) * up(x)). Inference runs it from the model's stacks of the
 * three weights (Model.mlpStack): matmulSwiglu then one matmul, instead of two matmuls,
 * their outputs and a swiglu pass. A model in training (no stacks), and routed experts
 * run alone (`stacked` false: the search's candidates, which would otherwise hold every
 * expert a second time beside the routed experts' stacks), use the three weights.
 */
export async function swigluMlp(
  model: Model,
  x: Tensor,
  names: MlpNames,
  stacked = true,
): Promise<Tensor> {
  const be = model.backend;
  stacked &&= model.stacking;
  let a: Tensor;
  if (stacked) a = be.matmulSwiglu(x, await model.mlpStack(names, "gate_up"));
  else {
    const g = be.matmul(x, await model.weight(names.gate));
    const u = be.matmul(x, await model.weight(names.up));
    a = be.swiglu(g, u);
    be.free(g), be.free(u);
  }
  const down = stacked ? await model.mlpStack(names, "down") : await model.weight(names.down);
  const y = be.matmul(a, down);
  be.free(a);
  return y;
}

export async function mlpBlock(
  model: Model,
  l: number,
  mlp: MlpSpec,
  xn: Tensor,
  hooks: ForwardHooks,
): Promise<Tensor> {
  const be = model.backend, s = model.spec;
  if (mlp.kind === "dense") {
    // A condensed Qwen layer that kept no routed expert is its gated shared expert alone.
    if (mlp.width === 0 && mlp.gatedShared) return await gatedSharedExpert(model, l, xn);
    const y = await swigluMlp(model, xn, mlpNames((p) => denseName(l, p)));
    if (!mlp.gatedShared) return y;
    const shared = await gatedSharedExpert(model, l, xn);
    const sum = be.add(y, shared);
    be.free(y), be.free(shared);
    return sum;
  }
  if (mlp.kind !== "moe") throw new Error(`layer ${l}: no MLP to run`);

  const logits = be.matmul(xn, await model.weight(routerName(s, l)));
  // Compressed experts split the raw (unnormalised) top-k probabilities themselves.
  const ce = mlp.mainExperts !== undefined;
  const route = ce
    ? { k: mlp.topK, normalize: false, eps: 0 }
    : { k: mlp.topK, normalize: mlp.renorm.normalize, eps: mlp.renorm.eps };
  const oneByOne = !model.expertsStackable(l);

  // Shared experts first (always on), then routed experts accumulate into the same rows.
  let out: Tensor;
  if (mlp.sharedWidth > 0) {
    out = mlp.sharedGate
      ? await gatedSharedExpert(model, l, xn)
      : await swigluMlp(model, xn, mlpNames((p) => sharedName(s, l, p)));
  } else {
    out = be.tensor(new Float32Array(xn.shape[0] * s.hidden), [xn.shape[0], s.hidden]);
  }
  // The routing comes to the host only where something needs it there: an observer,
  // compressed experts the device cannot run, or experts run one by one. Else it never
  // leaves the device.
  if (ce && !hooks.onRouter && await compressedExpertsOnDevice(model, l, mlp, xn, logits, out)) {
    be.free(logits);
    return out;
  }
  let routing: Routing | undefined;
  if (hooks.onRouter || ce || oneByOne) {
    routing = await be.routeTopK(logits, route.k, route.normalize, route.eps);
    await hooks.onRouter?.(l, logits, routing);
  }
  if (ce) await dispatchCompressedExperts(model, l, mlp, xn, routing!, out);
  else if (oneByOne) await expertsOneByOne(model, l, xn, routing!, mlp.topK, mlp.experts, out);
  else {
    const stacks = {
      gateUp: await model.expertStack(l, "gate_up", mlp.experts),
      down: await model.expertStack(l, "down", mlp.experts),
    };
    await be.routedExperts(xn, logits, stacks, route, out);
  }
  be.free(logits);
  return out;
}

/** Whether layer l's compressed experts run grouped: main experts frozen, width unpadded. */
function groupedMainExperts(model: Model, l: number, mlp: MoeSpec): boolean {
  return model.expertsStackable(l) && mlp.expertWidth % GATE_UP_RUN === 0;
}

/** Layer l's expert stacks, gate and up apart, for the compressed experts' grouped path. */
async function separateStacks(model: Model, l: number, mlp: MoeSpec) {
  return {
    gate: await model.expertStack(l, "gate", mlp.experts),
    up: await model.expertStack(l, "up", mlp.experts),
    down: await model.expertStack(l, "down", mlp.experts),
  };
}

/**
 * dispatchCompressedExperts with the routing kept on the device, where the backend can
 * (DeviceCompressedExperts) and the main experts run grouped; false, having done nothing,
 * where it cannot.
 */
async function compressedExpertsOnDevice(
  model: Model,
  l: number,
  mlp: MoeSpec,
  xn: Tensor,
  logits: Tensor,
  out: Tensor,
): Promise<boolean> {
  const be = model.backend;
  if (!hasDeviceCompressedExperts(be) || !groupedMainExperts(model, l, mlp)) return false;
  const stacks = await separateStacks(model, l, mlp);
  const slots = () => cesSlots(model, l, mlp, true);
  const route = {
    k: mlp.topK,
    mainExperts: mlp.mainExperts!,
    renormOver: mlp.renormOver ?? "top_k",
    normalize: mlp.renorm.normalize,
    eps: mlp.renorm.eps,
  };
  return be.compressedExperts(xn, logits, stacks, slots, route, out);
}

/**
 * One main expert's inputs and intermediates in a compressed-experts layer, or with
 * `grouped` every main expert's at once (their stacks' plan: rows are then a token once
 * per main expert of it, expert by expert).
 */
export interface ScaledExpertValues {
  expert: number; // -1 when grouped
  grouped?: { groupRows: Int32Array; sources: Int32Array };
  rows: Int32Array; // token rows
  slots: Int32Array; // index into the [N, k_m] main arrays for each row
  scales: Float32Array; // w_m per row
  xg: Tensor; // [n, H] gathered xn * theta0, xn * theta2
  xu: Tensor;
  t1: Tensor; // [n, W] gathered theta1
  g: Tensor; // [n, W] gate, up, silu(g) * u, and a * t1
  u: Tensor;
  a: Tensor;
  as: Tensor;
  y: Tensor; // [n, H] down(as)
}

/**
 * Compressed experts (compressed_experts.ts): theta per token from the aux
 * experts' ces vectors, then each main expert on its tokens with scaled inputs and
 * intermediate: out[t] += w_m * down(silu(gate(x*theta0)) * up(x*theta2) * theta1).
 * The input scales are per token, so x*theta0 and x*theta2 are taken once a token, before
 * the gather (not once a token and main expert). Frozen main experts run grouped from
 * their stacks (gate and up apart: their inputs differ); trainable ones, or widths the
 * stacks pad, one by one. Training passes `keep` to receive the values for its backward,
 * and then owns the returned theta0 and theta2 [N, H] and aux alphas [N, E]; otherwise
 * everything is freed as soon as it is used.
 */
export async function dispatchCompressedExperts(
  model: Model,
  l: number,
  mlp: MoeSpec,
  xn: Tensor,
  raw: Routing,
  out: Tensor,
  keep?: ScaledExpertValues[],
): Promise<{ split: CeRouting; t0?: Tensor; t2?: Tensor; alpha?: Tensor }> {
  const be = model.backend, s = model.spec;
  const split = splitRouting(raw, mlp);
  // [N, H] gate input scale, [N, W] intermediate scale, [N, H] up input scale
  const { t0, t1, t2, alpha } = await thetaOf(model, l, mlp, split);
  const scaled = { xg: be.mul(xn, t0), xu: be.mul(xn, t2), t1 }; // per token
  const main = { indices: split.mainIndices, weights: split.mainWeights };
  const km = mlp.mainExperts!;
  const done = (values: ScaledExpertValues) => {
    if (keep) keep.push(values);
    else for (const v of scaledTensors(values)) be.free(v);
  };
  if (groupedMainExperts(model, l, mlp)) {
    const plan = expertPlan(main, km, mlp.experts);
    const stacks = await separateStacks(model, l, mlp);
    const values = scaledExpert(
      model,
      scaled,
      plan.order,
      (x, part) => be.groupedMatmul(x, stacks[part], plan.groupRows),
    );
    be.combineRows(out, values.y, plan.sources, plan.scales, km);
    const grouped = { groupRows: plan.groupRows, sources: plan.sources };
    const rows = { rows: plan.order, slots: plan.slots, scales: plan.rowScales };
    done({ expert: -1, grouped, ...rows, ...values });
  } else {
    const groups = groupByExpert(main, km, mlp.experts);
    for (let e = 0; e < mlp.experts; e++) {
      const rows = groups.rows[e];
      if (rows.length === 0) continue;
      const weights = {
        gate: await model.weight(expertName(s, l, e, "gate")),
        up: await model.weight(expertName(s, l, e, "up")),
        down: await model.weight(expertName(s, l, e, "down")),
      };
      const values = scaledExpert(model, scaled, rows, (x, p) => be.matmul(x, weights[p]));
      be.scatterAddRows(out, values.y, rows, groups.scales[e]);
      done({ expert: e, rows, slots: groups.slots[e], scales: groups.scales[e], ...values });
    }
  }
  be.free(scaled.xg), be.free(scaled.xu), be.free(t1);
  if (keep) return { split, t0, t2, alpha };
  be.free(t0), be.free(t2), be.free(alpha);
  return { split };
}

/**
 * down(silu(gate(xg)) * up(xu) * t1) on the token rows `rows` of the per-token scaled
 * inputs and theta1, keeping each value.
 */
function scaledExpert(
  model: Model,
  scaled: { xg: Tensor; xu: Tensor; t1: Tensor },
  rows: Int32Array,
  project: (x: Tensor, part: "gate" | "up" | "down") => Tensor,
) {
  const be = model.backend;
  const [xg, xu, t1] = [scaled.xg, scaled.xu, scaled.t1].map((v) => be.gatherRows(v, rows));
  const g = project(xg, "gate"), u = project(xu, "up");
  const a = be.swiglu(g, u);
  const as = be.mul(a, t1);
  const y = project(as, "down");
  return { xg, xu, t1, g, u, a, as, y };
}

/** The tensors of a compressed-experts values set. */
export function scaledTensors(e: ScaledExpertValues): Tensor[] {
  return [e.xg, e.xu, e.t1, e.g, e.u, e.a, e.as, e.y];
}

/** Qwen2-MoE: sigmoid(x . shared_expert_gate) * shared_expert(x). */
export async function gatedSharedExpert(model: Model, l: number, xn: Tensor): Promise<Tensor> {
  const be = model.backend, s = model.spec;
  const y = await swigluMlp(model, xn, mlpNames((p) => sharedName(s, l, p)));
  const g = be.matmul(xn, await model.weight(sharedGateName(l)));
  const out = be.sigmoidScaleRows(y, g);
  be.free(y), be.free(g);
  return out;
}

/**
 * Routed experts one by one on their own weights (a model in training has no stacks; the
 * experts in training are their f32 master copies, updated in place): each on its tokens,
 * added back with the routing weights.
 */
async function expertsOneByOne(
  model: Model,
  l: number,
  xn: Tensor,
  routing: Routing,
  topK: number,
  numExperts: number,
  out: Tensor,
): Promise<void> {
  const be = model.backend, s = model.spec;
  const { rows, scales } = groupByExpert(routing, topK, numExperts);
  for (let e = 0; e < numExperts; e++) {
    if (rows[e].length === 0) continue;
    const xe = be.gatherRows(xn, rows[e]);
    const y = await swigluMlp(model, xe, mlpNames((p) => expertName(s, l, e, p)), false);
    be.scatterAddRows(out, y, rows[e], scales[e]);
    be.free(xe), be.free(y);
  }
}

/**
 * Each expert's routed tokens, from the grouped plan (expertPlan): for expert e, rows[e]
 * are its token rows (ascending), slots[e] their indices into routing.indices and
 * scales[e] their routing weights.
 */
export function groupByExpert(
  routing: Routing,
  topK: number,
  numExperts: number,
): { rows: Int32Array[]; slots: Int32Array[]; scales: Float32Array[] } {
  const plan = expertPlan(routing, topK, numExperts);
  const rows: Int32Array[] = [], slots: Int32Array[] = [], scales: Float32Array[] = [];
  for (let e = 0, r0 = 0; e < numExperts; r0 += plan.groupRows[e++]) {
    const r1 = r0 + plan.groupRows[e];
    rows.push(plan.order.subarray(r0, r1));
    slots.push(plan.slots.subarray(r0, r1));
    scales.push(Float32Array.from(slots[e], (i) => routing.weights[i]));
  }
  return { rows, slots, scales };
}

export async function finalNorm(model: Model, h: Tensor): Promise<Tensor> {
  return model.backend.rmsNorm(h, await model.weight("model.norm.weight"), model.spec.eps);
}

export async function lmHead(model: Model, hn: Tensor): Promise<Tensor> {
  return model.backend.matmul(hn, await model.weight(model.lmHeadName()));
}

/**
 * The LM head's logits of the final normed hidden states: every row, or only `rows` in
 * that order (the norm is per row, so rows can be picked after it). Frees hn.
 */
export async function logitsOf(model: Model, hn: Tensor, rows?: Int32Array): Promise<Tensor> {
  const be = model.backend;
  if (rows) {
    const picked = be.gatherRows(hn, rows);
    be.free(hn), hn = picked;
  }
  const logits = await lmHead(model, hn);
  be.free(hn);
  return logits;
}

/** logitsOf, read back. */
export async function readLogits(
  model: Model,
  hn: Tensor,
  rows?: Int32Array,
): Promise<Float32Array> {
  const be = model.backend, logits = await logitsOf(model, hn, rows);
  const out = (await be.read(logits)).slice();
  be.free(logits);
  return out;
}

export interface ForwardResult {
  /** [batch * seqLen, vocab], or [logitRows.length, vocab] */
  logits: Float32Array;
  /** HF hidden_states: [0] embeddings, [l] output of layer l-1, [L] after the final norm. Only with collectHidden. */
  hiddenStates?: Float32Array[];
  /** Router logits per MoE layer, [tokens, experts]. Only with collectRouter. */
  routerLogits?: Map<number, Float32Array>;
  routing?: Map<number, Routing>;
}

export interface ForwardOptions extends ForwardHooks {
  collectHidden?: boolean;
  collectRouter?: boolean;
  /** Release each layer's weights after use (layer-wise mode; the next call reloads them). */
  layerwise?: boolean;
  /**
   * Only these rows of [batch * seqLen] through the LM head, in this order (an evaluation
   * scores a few positions of each sequence: at a real vocabulary, all rows' logits are the
   * largest matmul of the forward and gigabytes to read back).
   */
  logitRows?: Int32Array;
}

/** Full forward pass of token ids [batch, seqLen] (row-major). */
export async function forward(
  model: Model,
  ids: Int32Array,
  shape: BatchShape,
  opts: ForwardOptions = {},
): Promise<ForwardResult> {
  const be = model.backend;
  if (ids.length !== shape.batch * shape.seqLen) {
    throw new Error(`forward: ${ids.length} ids for batch ${shape.batch} x ${shape.seqLen}`);
  }
  for (const row of opts.logitRows ?? []) {
    if (!Number.isInteger(row) || row < 0 || row >= ids.length) {
      throw new Error(`forward: logit row ${row} out of [0, ${ids.length})`);
    }
  }
  const result = {} as ForwardResult;
  if (opts.collectHidden) result.hiddenStates = [];
  if (opts.collectRouter) (result.routerLogits = new Map()), (result.routing = new Map());
  let h = await embed(model, ids);
  if (opts.collectHidden) result.hiddenStates!.push(await be.read(h));
  // Only an observer brings the routing to the host.
  const observed = opts.collectRouter || opts.onRouter;
  let normed: Tensor | undefined; // h through the next layer's first norm (FusedNorm)
  for (let l = 0; l < model.spec.numLayers; l++) {
    const fuse: FusedNorm = { normed, next: await nextNorm(model, l) };
    const next = await runLayer(
      model,
      l,
      h,
      shape,
      {
        mlpOverride: opts.mlpOverride,
        onRouter: observed
          ? async (layer, logits, routing) => {
            if (opts.collectRouter) {
              result.routerLogits!.set(layer, (await be.read(logits)).slice());
              result.routing!.set(layer, routing);
            }
            await opts.onRouter?.(layer, logits, routing);
          }
          : undefined,
      },
      undefined,
      fuse,
    );
    be.free(h);
    h = next, normed = fuse.outNormed;
    if (opts.layerwise) model.releaseLayer(l);
    await opts.onLayerOutput?.(l, h);
    if (opts.collectHidden && l < model.spec.numLayers - 1) {
      result.hiddenStates!.push((await be.read(h)).slice());
    }
  }
  const hn = normed ?? await finalNorm(model, h);
  be.free(h);
  if (opts.collectHidden) result.hiddenStates!.push((await be.read(hn)).slice());
  result.logits = await readLogits(model, hn, opts.logitRows);
  return result;
}
