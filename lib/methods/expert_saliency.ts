// Expert saliency for pruning (docs/expert-pruning.md), recorded in the routing-profile
// pass: per MoE layer and routed expert, over the tokens that route to it (the expert is
// in the token's top-k), the count, the mean routing weight g, the mean L2 norm of the
// expert's own output ||f(x)|| (before the routing weight scales it), and REAP's
// saliency, the mean of g * ||f(x)|| (Lasby et al. 2025, arXiv 2510.13999, eq. 9).
// g is the weight the model multiplies the output by: the softmax probability,
// renormalised over the top-k only where the config renormalises.

import { expertPlan, type Routing, supportsTraining, type Tensor } from "../backend/backend.ts";
import type { Model } from "../model/model.ts";
import { moeSpec } from "./plan.ts";

export const CRITERIA = ["reap", "frequency", "weight", "norm"] as const;
export type Criterion = typeof CRITERIA[number];

export interface LayerSaliency {
  layer: number;
  tokens: number;
  experts: number;
  topK: number;
  /** Tokens that route to each expert. */
  freq: number[];
  /** Mean routing weight g over those tokens (0 for an expert no token chose). */
  weight: number[];
  /** REAP: mean of g * ||f(x)||_2 over those tokens. */
  reap: number[];
  /** Mean ||f(x)||_2 over those tokens. */
  norm: number[];
}

export interface ExpertSaliency {
  layers: Record<string, LayerSaliency>;
}

class LayerSums {
  tokens = 0;
  freq: Float64Array;
  weight: Float64Array;
  reap: Float64Array;
  norm: Float64Array;
  constructor(readonly experts: number, readonly topK: number) {
    this.freq = new Float64Array(experts);
    this.weight = new Float64Array(experts);
    this.reap = new Float64Array(experts);
    this.norm = new Float64Array(experts);
  }
}

/**
 * Sums over calibration batches. `observe` runs the routed experts a second time on their
 * tokens (the grouped path from the layer's expert stacks, which the forward has already
 * built), because the forward combines their outputs without keeping them.
 */
export class SaliencyRecorder {
  private layers = new Map<number, LayerSums>();

  /** One batch of layer l: xn [N, H] the MLP input, `routing` the model's top-k. */
  async observe(model: Model, l: number, xn: Tensor, routing: Routing): Promise<void> {
    const be = model.backend, mlp = moeSpec(model, l), E = mlp.experts, k = mlp.topK;
    if (!supportsTraining(be)) {
      throw new Error(`backend ${be.name} has no swigluGateUp: cannot record expert saliency`);
    }
    let c = this.layers.get(l);
    if (!c) this.layers.set(l, c = new LayerSums(E, k));
    const H = model.spec.hidden;
    const plan = expertPlan(routing, k, E);
    const xe = be.gatherRows(xn, plan.order);
    const gu = be.groupedMatmul(xe, await model.expertStack(l, "gate_up", E), plan.groupRows);
    be.free(xe);
    const a = be.swigluGateUp(gu);
    be.free(gu);
    const yt = be.groupedMatmul(a, await model.expertStack(l, "down", E), plan.groupRows);
    be.free(a);
    const y = await be.read(yt);
    c.tokens += routing.indices.length / k;
    for (let e = 0, row = 0; e < E; e++) {
      for (let i = 0; i < plan.groupRows[e]; i++, row++) {
        let ss = 0;
        for (let h = row * H; h < (row + 1) * H; h++) ss += y[h] * y[h];
        const norm = Math.sqrt(ss), g = plan.rowScales[row];
        c.freq[e]++;
        c.weight[e] += g;
        c.norm[e] += norm;
        c.reap[e] += g * norm;
      }
    }
    be.free(yt);
  }

  result(): ExpertSaliency {
    const layers: Record<string, LayerSaliency> = {};
    for (const [l, c] of [...this.layers].sort((a, b) => a[0] - b[0])) {
      const mean = (sums: Float64Array) =>
        [...sums].map((s, e) => (c.freq[e] > 0 ? s / c.freq[e] : 0));
      layers[l] = {
        layer: l,
        tokens: c.tokens,
        experts: c.experts,
        topK: c.topK,
        freq: [...c.freq],
        weight: mean(c.weight),
        reap: mean(c.reap),
        norm: mean(c.norm),
      };
    }
    return { layers };
  }
}

/** A layer's scores under a criterion (higher = more salient). */
export function scoresOf(s: LayerSaliency, criterion: Criterion): number[] {
  return criterion === "frequency" ? s.freq : s[criterion];
}

/**
 * The `keep` most salient experts, in ascending id order (the pruned layer keeps their
 * relative order). Ties go to the lower id.
 */
export function mostSalient(scores: number[], keep: number): number[] {
  const ids = scores.map((_, e) => e);
  ids.sort((a, b) => scores[b] - scores[a] || a - b);
  return ids.slice(0, keep).sort((a, b) => a - b);
}
