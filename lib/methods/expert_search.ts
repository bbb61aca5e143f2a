// Greedy expert selection per MoE layer (CD-MoE 1c). For layer l, all other layers
// original: start with C = []; k times, add the expert c whose condensed layer
// (shared + sum_{C+[c]} wbar_e expert_e) gives the lowest divergence between the
// original and the condensed output of decoder layer l, as the release compares it: HF
// hidden_states[l + 1], the residual stream, which for the last decoder layer is the
// final norm of it.
//
// Fast (default, exact): the layer's input is cached once (x, xn per batch); every expert
// is evaluated once on it, and a candidate's output is combined arithmetically,
// x + (shared + sum wbar_e E_e), with the same f32 operations in the same order as the
// naive path; on a backend with jsDivergenceRows (WebGPU) the outputs stay on the device
// and candidates are built and scored there (f32 JS, docs/cd-moe.md). Naive (reference):
// one full model forward per candidate via mlpOverride.

import {
  type Backend,
  type DeviceDivergence,
  hasDeviceDivergence,
  type Tensor,
} from "../backend/backend.ts";
import { finalNorm, forward } from "../model/decoder.ts";
import type { Model } from "../model/model.ts";
import type { CalibrationBatch } from "./calibration.ts";
import { JS_EPS, type Metric, Reference } from "./divergence.ts";
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

/**
 * HF hidden_states[l + 1] from the residual stream h after decoder layer l: h itself, or
 * for the last layer the final norm of it (HF replaces that entry by the normed state).
 * Null where h itself is compared; otherwise returns a new tensor.
 */
function layerTarget(model: Model, l: number): ((h: Tensor) => Promise<Tensor>) | null {
  return l === model.spec.numLayers - 1 ? (h) => finalNorm(model, h) : null;
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
  const target = layerTarget(model, l);
  const original = target ? cache.finalHidden : cache.hIn[l + 1];
  batches.forEach((b, bi) => ref.add(original[bi], b.shape, b.ids));

  // Every expert once on the cached input: base = shared output, expertOut[e][b].
  const base: Tensor[] = [];
  const expertOut: Tensor[][] = Array.from({ length: E }, () => []);
  for (let bi = 0; bi < batches.length; bi++) {
    const xt = be.tensor(xn[bi], [xn[bi].length / H, H]);
    base.push(await sharedOutput(model, l, xt));
    for (let e = 0; e < E; e++) expertOut[e].push(await expertOutput(model, l, e, xt));
    be.free(xt);
  }
  const device = opts.metric === "js-hidden" && hasDeviceDivergence(be) ? be : null;
  const scorer = device
    ? deviceScorer(device, ref, x, base, expertOut, target)
    : await hostScorer(be, ref, x, base, expertOut, target);

  const total = expertCandidateCount(E, opts.k);
  let done = 0;
  const order: number[] = [], steps: ExpertStep[] = [];
  try {
    for (let step = 0; step < opts.k; step++) {
      const candidates: Record<string, number> = {};
      for (let c = 0; c < E; c++) {
        if (order.includes(c)) continue;
        const docMeans = await scorer.score(c, opts.avgW[c]);
        candidates[c] = docMeans.reduce((a, b) => a + b, 0) / docMeans.length;
        opts.progress?.(++done, total);
      }
      const best = pickBest(candidates);
      order.push(best);
      steps.push({ chosen: best, divergence: candidates[best], candidates });
      scorer.accept(best, opts.avgW[best]);
    }
  } finally {
    scorer.free();
  }
  return {
    layer: l,
    order,
    wbar: order.map((e) => opts.avgW[e]),
    steps,
    seconds: (performance.now() - t0) / 1000,
  };
}

/**
 * The fast search's candidates x + (base + w expert_c) and their per-document divergence,
 * and base += w expert_c for the chosen one, all with the same f32 operations in the same
 * order as the naive path.
 */
interface CandidateScorer {
  score(c: number, w: number): Promise<number[]>;
  accept(c: number, w: number): void;
  free(): void;
}

/** On the host, any metric: the outputs read back once, the Reference's rows in f64. */
async function hostScorer(
  be: Backend,
  ref: Reference,
  x: Float32Array[],
  baseTensors: Tensor[],
  expertTensors: Tensor[][],
  target: ((h: Tensor) => Promise<Tensor>) | null,
): Promise<CandidateScorer> {
  const H = baseTensors[0].shape[1];
  // One read for every output: base's batches, then each expert's.
  const all = [...baseTensors, ...expertTensors.flat()], values = await be.readAll(all);
  all.forEach((t) => be.free(t));
  const nb = baseTensors.length, base = values.slice(0, nb);
  const expertOut = expertTensors.map((_, e) => values.slice(nb + e * nb, nb + (e + 1) * nb));
  const scratch = x.map((xb) => new Float32Array(xb.length));
  return {
    async score(c, w) {
      const docMeans: number[] = [];
      for (let bi = 0; bi < x.length; bi++) {
        const out = scratch[bi], xb = x[bi], bb = base[bi], eb = expertOut[c][bi];
        // f32 like the backend: scale, add to the MLP sum, add to the residual.
        for (let i = 0; i < out.length; i++) {
          out[i] = xb[i] + Math.fround(bb[i] + Math.fround(w * eb[i]));
        }
        if (!target) docMeans.push(...ref.docMeans(bi, out));
        else {
          const h = be.tensor(out, [out.length / H, H]);
          docMeans.push(...ref.docMeans(bi, await readTarget(be, target, h)));
          be.free(h);
        }
      }
      return docMeans;
    },
    accept(c, w) {
      for (let bi = 0; bi < x.length; bi++) {
        const bb = base[bi], eb = expertOut[c][bi];
        for (let i = 0; i < bb.length; i++) bb[i] = bb[i] + Math.fround(w * eb[i]);
      }
    },
    free() {},
  };
}

/** h, or target(h) where there is one, read back to the host. */
async function readTarget(
  be: Backend,
  target: ((h: Tensor) => Promise<Tensor>) | null,
  h: Tensor,
): Promise<Float32Array> {
  if (!target) return (await be.read(h)).slice();
  const t = await target(h), out = (await be.read(t)).slice();
  be.free(t);
  return out;
}

/**
 * On the device (JS on a backend with jsDivergenceRows): the outputs stay there, each
 * candidate is built by the backend's scale and adds and scored by its JS kernel, and only
 * one number a row comes back. For a large model this is most of the search: about
 * experts x k candidates a layer, each over tokens x hidden entries.
 */
function deviceScorer(
  be: Backend & DeviceDivergence,
  ref: Reference,
  x: Float32Array[],
  base: Tensor[],
  expertOut: Tensor[][],
  target: ((h: Tensor) => Promise<Tensor>) | null,
): CandidateScorer {
  const H = base[0].shape[1];
  const xt = x.map((xb) => be.tensor(xb, [xb.length / H, H]));
  const p = x.map((_, bi) => be.tensor(ref.probs(bi), [x[bi].length / H, H]));
  // base + w expert_c, as the host's fround(bb + fround(w eb))
  const withExpert = (bi: number, c: number, w: number) => {
    const scaled = be.scale(expertOut[c][bi], w), sum = be.add(base[bi], scaled);
    be.free(scaled);
    return sum;
  };
  return {
    async score(c, w) {
      const js: Tensor[] = [];
      for (let bi = 0; bi < x.length; bi++) {
        const mlp = withExpert(bi, c, w), cand = be.add(xt[bi], mlp);
        const compared = target ? await target(cand) : cand;
        js.push(be.jsDivergenceRows(p[bi], compared, JS_EPS));
        be.free(mlp), be.free(cand);
        if (compared !== cand) be.free(compared);
      }
      const perRow = await be.readAll(js);
      js.forEach((t) => be.free(t));
      return perRow.flatMap((rows, bi) => ref.meansOfRows(bi, rows));
    },
    accept(c, w) {
      for (let bi = 0; bi < x.length; bi++) {
        const next = withExpert(bi, c, w);
        be.free(base[bi]);
        base[bi] = next;
      }
    },
    free() {
      for (const t of [...xt, ...p, ...base, ...expertOut.flat()]) be.free(t);
    },
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
  // HF hidden_states[l + 1]: the residual stream after layer l, normed for the last layer.
  const target = layerTarget(model, l);
  for (const b of batches) {
    let layerOut: Float32Array | null = null;
    await forward(model, b.ids, b.shape, {
      layerwise: opts.layerwise,
      onLayerOutput: async (layer, h) => {
        if (layer === l) layerOut = await readTarget(be, target, h);
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
            if (layer === l) layerOut = await readTarget(be, target, h);
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
