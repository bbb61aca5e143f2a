// What a compression does to each layer, and how a changed layer runs. Every search
// mode (fast, naive) and the in-memory condensed model go through these functions, so
// they agree bit for bit on the CPU backend.

import type { Backend, Routing, Tensor } from "../backend/backend.ts";
import { expertName, layerPrefix, mlpNames, type MlpSpec, sharedName } from "../model/config.ts";
import {
  attentionBlock,
  type BatchShape,
  gatedSharedExpert,
  mlpBlock,
  runLayer,
  swigluMlp,
} from "../model/decoder.ts";
import type { Model } from "../model/model.ts";

export type LayerChange =
  /** CD-MoE: shared experts + `experts` with fixed weights `wbar`, no router. */
  | { kind: "condense"; experts: number[]; wbar: number[] }
  /** LayerDrop: the MoE block is removed, the residual passes through. */
  | { kind: "layerdrop" }
  /** BlockDrop: the whole decoder block (attention + MoE) is removed. */
  | { kind: "blockdrop" };

/** Decoder layer index -> change; layers not in the map run as in the original model. */
export type Plan = Map<number, LayerChange>;

export function moeSpec(model: Model, l: number): Extract<MlpSpec, { kind: "moe" }> {
  const mlp = model.spec.layers[l].mlp;
  if (mlp.kind !== "moe") throw new Error(`layer ${l} is not an MoE layer`);
  return mlp;
}

/** The always-on part of an MoE layer: shared experts (Qwen: sigmoid-gated), or zeros. */
export async function sharedOutput(model: Model, l: number, xn: Tensor): Promise<Tensor> {
  const be = model.backend, s = model.spec, mlp = moeSpec(model, l);
  if (mlp.sharedWidth === 0) {
    return be.tensor(new Float32Array(xn.shape[0] * s.hidden), [xn.shape[0], s.hidden]);
  }
  if (mlp.sharedGate) return await gatedSharedExpert(model, l, xn);
  return await swigluMlp(model, xn, mlpNames((p) => sharedName(s, l, p)));
}

/** Routed expert e of layer l applied to every row of xn. */
export function expertOutput(model: Model, l: number, e: number, xn: Tensor): Promise<Tensor> {
  const s = model.spec;
  return swigluMlp(model, xn, mlpNames((p) => expertName(s, l, e, p)), false);
}

/** y = shared(xn) + sum_i wbar[i] * expert_{experts[i]}(xn), accumulated in list order. */
export async function condensedMlp(
  model: Model,
  l: number,
  xn: Tensor,
  experts: number[],
  wbar: number[],
): Promise<Tensor> {
  const be = model.backend;
  let out = await sharedOutput(model, l, xn);
  for (let i = 0; i < experts.length; i++) {
    const y = await expertOutput(model, l, experts[i], xn);
    const ys = be.scale(y, wbar[i]);
    const next = be.add(out, ys);
    be.free(y), be.free(ys), be.free(out);
    out = next;
  }
  return out;
}

function zeros(be: Backend, rows: number, cols: number): Tensor {
  return be.tensor(new Float32Array(rows * cols), [rows, cols]);
}

/** One decoder layer under a change (or the original layer when `change` is undefined). */
export function runPlannedLayer(
  model: Model,
  l: number,
  h: Tensor,
  shape: BatchShape,
  change: LayerChange | undefined,
): Promise<Tensor> {
  const be = model.backend;
  if (!change) return runLayer(model, l, h, shape);
  if (change.kind === "blockdrop") return Promise.resolve(be.scale(h, 1));
  return runLayer(model, l, h, shape, {
    mlpOverride: (layer, xn) => mlpFor(model, layer, xn, change),
  });
}

/** The mlpOverride body for a change (layerdrop: x + 0 = x exactly). */
export function mlpFor(
  model: Model,
  l: number,
  xn: Tensor,
  change: LayerChange,
): Promise<Tensor> {
  if (change.kind === "condense") return condensedMlp(model, l, xn, change.experts, change.wbar);
  return Promise.resolve(zeros(model.backend, xn.shape[0], model.spec.hidden));
}

/**
 * The original MoE layer split where the caches need it: x = residual after attention,
 * xn = normed MLP input, out = x + moe(xn). Same ops in the same order as runLayer.
 */
export async function moeLayerParts(
  model: Model,
  l: number,
  h: Tensor,
  shape: BatchShape,
  onRouter?: (logits: Tensor, routing: Routing) => void | Promise<void>,
): Promise<{ x: Tensor; xn: Tensor; out: Tensor }> {
  const be = model.backend, p = layerPrefix(l);
  const hn = be.rmsNorm(h, await model.weight(`${p}input_layernorm.weight`), model.spec.eps);
  const attn = await attentionBlock(model, l, hn, shape);
  be.free(hn);
  const { sum: x, normed: xn } = be.addRmsNorm(
    h,
    attn,
    await model.weight(`${p}post_attention_layernorm.weight`),
    model.spec.eps,
  );
  be.free(attn);
  const mlp = await mlpBlock(model, l, moeSpec(model, l), xn, {
    onRouter: onRouter && ((_layer, logits, routing) => onRouter(logits, routing)),
  });
  const out = be.add(x, mlp);
  be.free(mlp);
  return { x, xn, out };
}
