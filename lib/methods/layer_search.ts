// Greedy layer search (CD-MoE 1d) and the drop baselines. Start with the changed set
// L = []; n times, try every MoE layer not in L, apply the change to L + [cand] and keep
// the candidate whose final output (final normed hidden state, or logits) diverges least
// from the original model's.
//
// Fast (default, exact): the hidden state entering each layer under the current set L is
// cached; a candidate c only reruns layers c..end from that cache, and the winner's
// states become the new cache. Naive (reference): a full forward per candidate.

import { embed } from "../model/decoder.ts";
import type { Model } from "../model/model.ts";
import type { CalibrationBatch } from "./calibration.ts";
import { type Metric, onHidden, Reference } from "./divergence.ts";
import { finalHiddenOf, hiddenKey, type LayerCache, logitsOf, runFrom } from "./layer_cache.ts";
import type { LayerChange, Plan } from "./plan.ts";

export const VARIANTS = ["sr", "s", "layerdrop", "blockdrop"] as const;
export type Variant = typeof VARIANTS[number];

export interface LayerStep {
  step: number;
  layer: number;
  divergence: number;
  candidates: Record<string, number>;
}

export interface LayerSearchOptions {
  /** Layers that may be changed (the MoE layers). */
  layers: number[];
  n: number;
  metric: Metric;
  /** The change a variant applies to layer l. */
  changeFor: (l: number) => LayerChange;
  layerwise?: boolean;
  /** Steps already finished (resume); the search continues after them. */
  done?: LayerStep[];
  /** Called after each finished step (to save state). */
  onStep?: (step: LayerStep, all: LayerStep[]) => Promise<void> | void;
  /** Called with the candidates scored so far (of layerCandidateCount, a resumed search's included). */
  progress?: (done: number) => void;
}

export function layerCandidateCount(layers: number, n: number): number {
  let total = 0;
  for (let s = 0; s < n; s++) total += layers - s;
  return total;
}

export function planOf(order: number[], changeFor: (l: number) => LayerChange): Plan {
  return new Map(order.map((l) => [l, changeFor(l)]));
}

/** The original model's side of the layer-search divergence. */
export async function finalReference(
  model: Model,
  batches: CalibrationBatch[],
  finalHidden: Float32Array[],
  metric: Metric,
): Promise<Reference> {
  const dim = onHidden(metric) ? model.spec.hidden : model.spec.vocab;
  const ref = new Reference(metric, dim);
  for (let bi = 0; bi < batches.length; bi++) {
    const rows = metric === "loss"
      ? null
      : onHidden(metric)
      ? finalHidden[bi]
      : await logitsOf(model, finalHidden[bi]);
    ref.add(rows, batches[bi].shape, batches[bi].ids);
  }
  return ref;
}

/** Mean over documents of the divergence of final states `states` (entering the final norm). */
export async function finalDivergence(
  model: Model,
  ref: Reference,
  states: Float32Array[],
  metric: Metric,
): Promise<number> {
  const finalHidden = await finalHiddenOf(model, states);
  const docMeans: number[] = [];
  for (let bi = 0; bi < finalHidden.length; bi++) {
    const rows = onHidden(metric) ? finalHidden[bi] : await logitsOf(model, finalHidden[bi]);
    docMeans.push(...ref.docMeans(bi, rows));
  }
  return docMeans.reduce((a, b) => a + b, 0) / docMeans.length;
}

function pickBest(candidates: Record<string, number>): number {
  let best = -1, bestD = Infinity;
  for (const [c, d] of Object.entries(candidates)) {
    if (d < bestD || (d === bestD && Number(c) < best)) (best = Number(c)), (bestD = d);
  }
  return best;
}

export async function layerSearchFast(
  model: Model,
  cache: LayerCache,
  ref: Reference,
  opts: LayerSearchOptions,
): Promise<LayerStep[]> {
  const steps = [...(opts.done ?? [])];
  const order = steps.map((s) => s.layer);
  const batches = cache.batches, L = model.spec.numLayers, store = cache.store;
  // hIn[l]: the store key of the states entering layer l under the current set (the
  // original model's to begin with); rebuilt once when resuming. Keys are never reused,
  // so a key names one set of states.
  const hIn = Array.from({ length: L + 1 }, (_, l) => hiddenKey(l));
  let version = 0;
  const stateKey = (l: number) => `search.h${l}.${++version}`;
  const adopt = (l: number, key: string) => {
    if (hIn[l] !== hiddenKey(l)) store.delete(hIn[l]);
    hIn[l] = key;
  };
  if (order.length > 0) {
    const first = Math.min(...order);
    const states = await store.get(hIn[first]);
    await runFrom(model, batches, first, states, planOf(order, opts.changeFor), {
      layerwise: opts.layerwise,
      keep: async (l, s) => {
        const key = stateKey(l);
        await store.set(key, s);
        adopt(l, key);
      },
    });
  }
  let done = layerCandidateCount(opts.layers.length, steps.length);
  // Output of changed layer c computed from hIn[c]: reused while hIn[c] is the same
  // states (no earlier layer changed since), saving one layer per candidate.
  const changedOut = new Map<number, { input: string; out: string }>();
  try {
    while (steps.length < opts.n) {
      const candidates: Record<string, number> = {};
      // The states each later layer gets under the best candidate so far (store keys).
      let bestKept: string[] | null = null, bestD = Infinity, bestLayer = -1;
      for (const c of opts.layers) {
        if (order.includes(c)) continue;
        const kept: string[] = [];
        const plan = planOf([...order, c], opts.changeFor);
        let after = changedOut.get(c);
        if (!after || after.input !== hIn[c]) {
          const out = await runFrom(model, batches, c, await store.get(hIn[c]), plan, {
            layerwise: opts.layerwise,
            end: c + 1,
          });
          if (after) store.delete(after.out);
          after = { input: hIn[c], out: `search.out${c}.${++version}` };
          await store.set(after.out, out);
          changedOut.set(c, after);
        }
        const out = await runFrom(model, batches, c + 1, await store.get(after.out), plan, {
          layerwise: opts.layerwise,
          keep: async (l, s) => {
            kept[l] = stateKey(l);
            await store.set(kept[l], s);
          },
        });
        const d = await finalDivergence(model, ref, out, opts.metric);
        candidates[c] = d;
        const worse = bestKept && !(d < bestD || (d === bestD && c < bestLayer));
        for (const key of (worse ? kept : bestKept ?? []).filter(Boolean)) store.delete(key);
        if (!worse) (bestD = d), (bestLayer = c), (bestKept = kept);
        opts.progress?.(++done);
      }
      const best = pickBest(candidates);
      // The winner's changed output enters best + 1, its kept states the layers after.
      adopt(best + 1, changedOut.get(best)!.out);
      changedOut.delete(best);
      for (const [l, key] of bestKept!.entries()) {
        if (key === undefined) continue;
        if (l >= best + 2) adopt(l, key);
        else store.delete(key);
      }
      order.push(best);
      const step = {
        step: steps.length + 1,
        layer: best,
        divergence: candidates[best],
        candidates,
      };
      steps.push(step);
      await opts.onStep?.(step, steps);
    }
  } finally {
    for (let l = 0; l <= L; l++) if (hIn[l] !== hiddenKey(l)) store.delete(hIn[l]);
    for (const { out } of changedOut.values()) store.delete(out);
  }
  return steps;
}

/** The reference procedure: embed and run the whole model for every candidate. */
export async function layerSearchNaive(
  model: Model,
  batches: CalibrationBatch[],
  ref: Reference,
  opts: LayerSearchOptions,
): Promise<LayerStep[]> {
  const be = model.backend;
  const steps = [...(opts.done ?? [])];
  const order = steps.map((s) => s.layer);
  let done = layerCandidateCount(opts.layers.length, steps.length);
  while (steps.length < opts.n) {
    const candidates: Record<string, number> = {};
    for (const c of opts.layers) {
      if (order.includes(c)) continue;
      const states: Float32Array[] = [];
      for (const b of batches) {
        const h = await embed(model, b.ids);
        states.push((await be.read(h)).slice());
        be.free(h);
      }
      const plan = planOf([...order, c], opts.changeFor);
      const out = await runFrom(model, batches, 0, states, plan, { layerwise: opts.layerwise });
      candidates[c] = await finalDivergence(model, ref, out, opts.metric);
      opts.progress?.(++done);
    }
    const best = pickBest(candidates);
    order.push(best);
    const step = { step: steps.length + 1, layer: best, divergence: candidates[best], candidates };
    steps.push(step);
    await opts.onStep?.(step, steps);
  }
  return steps;
}
