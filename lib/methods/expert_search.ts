// Greedy expert selection per MoE layer (CD-MoE 1c). For layer l, all other layers
// original: start with C = []; k times, add the expert c whose condensed layer
// (shared + sum_{C+[c]} wbar_e expert_e) gives the lowest divergence between the
// original and the condensed output of decoder layer l.
//
// Fast (default, exact): the layer's input is cached once (x, xn per batch); every expert
// is evaluated once on it, and a candidate's output is combined arithmetically,
// x + (shared + sum wbar_e E_e), with the same f32 operations in the same order as the
// naive path. Naive (reference): one full model forward per candidate via mlpOverride.

import { forward } from "../model/decoder.ts";
import type { Model } from "../model/model.ts";
import type { CalibrationBatch } from "./calibration.ts";
import { type Metric, Reference } from "./divergence.ts";
import type { LayerCache } from "./layer_cache.ts";
import { condensedMlp, expertOutput, moeSpec, sharedOutput } from "./plan.ts";

export interface ExpertStep {
  chosen: number;
  divergence: number;
  /** Divergence of every candidate tried at this step. */
  candidates: Record<string, number>;
}

export interface ExpertSearchResult {
  layer: number;
  /** Chosen experts, best first; CD-MoE-SR with k experts keeps order.slice(0, k). */
  order: number[];
  wbar: number[];
  steps: ExpertStep[];
  seconds: number;
}

export interface ExpertSearchOptions {
  k: number;
  metric: Metric;
  /** avg_w of the layer's experts from the routing profile. */
  avgW: number[];
  /** Called after each candidate with (candidates done, total). */
  progress?: (done: number, total: number) => void;
}

export function expertCandidateCount(experts: number, k: number): number {
  let n = 0;
  for (let s = 0; s < k; s++) n += experts - s;
  return n;
}

function pickBest(candidates: Record<string, number>): number {
  let best = -1, bestD = Infinity;
  for (const [c, d] of Object.entries(candidates)) {
    if (d < bestD || (d === bestD && Number(c) < best)) (best = Number(c)), (bestD = d);
  }
  return best;
}

export async function expertSearchFast(
  model: Model,
  cache: LayerCache,
  l: number,
  opts: ExpertSearchOptions,
): Promise<ExpertSearchResult> {
  const t0 = performance.now();
  const be = model.backend, H = model.spec.hidden, E = moeSpec(model, l).experts;
  const { x, xn } = cache.moe.get(l)!;
  const batches = cache.batches;
  const ref = new Reference(opts.metric, H);
  batches.forEach((b, bi) => ref.add(cache.hIn[l + 1][bi], b.shape, b.ids));

  // Every expert once on the cached input: base = shared output, expertOut[e][b].
  const base: Float32Array[] = [];
  const expertOut: Float32Array[][] = Array.from({ length: E }, () => []);
  for (let bi = 0; bi < batches.length; bi++) {
    const xt = be.tensor(xn[bi], [xn[bi].length / H, H]);
    const s = await sharedOutput(model, l, xt);
    base.push((await be.read(s)).slice());
    be.free(s);
    for (let e = 0; e < E; e++) {
      const y = await expertOutput(model, l, e, xt);
      expertOut[e].push((await be.read(y)).slice());
      be.free(y);
    }
    be.free(xt);
  }

  const total = expertCandidateCount(E, opts.k);
  let done = 0;
  const order: number[] = [], steps: ExpertStep[] = [];
  const scratch = batches.map((_, bi) => new Float32Array(x[bi].length));
  for (let step = 0; step < opts.k; step++) {
    const candidates: Record<string, number> = {};
    for (let c = 0; c < E; c++) {
      if (order.includes(c)) continue;
      const w = opts.avgW[c], docMeans: number[] = [];
      for (let bi = 0; bi < batches.length; bi++) {
        const out = scratch[bi], xb = x[bi], bb = base[bi], eb = expertOut[c][bi];
        // f32 like the backend: scale, add to the MLP sum, add to the residual.
        for (let i = 0; i < out.length; i++) {
          out[i] = xb[i] + Math.fround(bb[i] + Math.fround(w * eb[i]));
        }
        docMeans.push(...ref.docMeans(bi, out));
      }
      candidates[c] = docMeans.reduce((a, b) => a + b, 0) / docMeans.length;
      opts.progress?.(++done, total);
    }
    const best = pickBest(candidates);
    order.push(best);
    steps.push({ chosen: best, divergence: candidates[best], candidates });
    const w = opts.avgW[best];
    for (let bi = 0; bi < batches.length; bi++) {
      const bb = base[bi], eb = expertOut[best][bi];
      for (let i = 0; i < bb.length; i++) bb[i] = bb[i] + Math.fround(w * eb[i]);
    }
  }
  return {
    layer: l,
    order,
    wbar: order.map((e) => opts.avgW[e]),
    steps,
    seconds: (performance.now() - t0) / 1000,
  };
}

/** The reference procedure: one full forward of the model per candidate and batch. */
export async function expertSearchNaive(
  model: Model,
  batches: CalibrationBatch[],
  l: number,
  opts: ExpertSearchOptions & { layerwise?: boolean },
): Promise<ExpertSearchResult> {
  const t0 = performance.now();
  const be = model.backend, H = model.spec.hidden, E = moeSpec(model, l).experts;
  const ref = new Reference(opts.metric, H);
  // The residual stream after layer l (HF hidden_states[l+1], except that HF's last entry
  // is after the final norm: we compare the residual stream for every layer).
  for (const b of batches) {
    let layerOut: Float32Array | null = null;
    await forward(model, b.ids, b.shape, {
      layerwise: opts.layerwise,
      onLayerOutput: async (layer, h) => {
        if (layer === l) layerOut = (await be.read(h)).slice();
      },
    });
    ref.add(layerOut!, b.shape, b.ids);
  }
  const total = expertCandidateCount(E, opts.k);
  let done = 0;
  const order: number[] = [], steps: ExpertStep[] = [];
  for (let step = 0; step < opts.k; step++) {
    const candidates: Record<string, number> = {};
    for (let c = 0; c < E; c++) {
      if (order.includes(c)) continue;
      const experts = [...order, c], wbar = experts.map((e) => opts.avgW[e]);
      const docMeans: number[] = [];
      for (let bi = 0; bi < batches.length; bi++) {
        let layerOut: Float32Array | null = null;
        await forward(model, batches[bi].ids, batches[bi].shape, {
          layerwise: opts.layerwise,
          mlpOverride: (layer, xn) =>
            layer === l ? condensedMlp(model, l, xn, experts, wbar) : Promise.resolve(undefined),
          onLayerOutput: async (layer, h) => {
            if (layer === l) layerOut = (await be.read(h)).slice();
          },
        });
        docMeans.push(...ref.docMeans(bi, layerOut!));
      }
      candidates[c] = docMeans.reduce((a, b) => a + b, 0) / docMeans.length;
      opts.progress?.(++done, total);
    }
    const best = pickBest(candidates);
    order.push(best);
    steps.push({ chosen: best, divergence: candidates[best], candidates });
  }
  return {
    layer: l,
    order,
    wbar: order.map((e) => opts.avgW[e]),
    steps,
    seconds: (performance.now() - t0) / 1000,
  };
}
