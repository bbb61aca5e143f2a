// Greedy expert selection per MoE layer (CD-MoE 1c). For layer l, all other layers
// original: start with C = []; k times, add the expert c whose condensed layer
// (shared + sum_{C+[c]} wbar_e expert_e) gives the lowest divergence between the
// original and the condensed output of decoder layer l, as the release compares it: HF
// hidden_states[l + 1], the residual stream, which for the last decoder layer is the
// final norm of it.
//
// Fast (default, exact): the layer's input is cached once (x, xn per batch); every expert
// is evaluated once on it (its outputs kept in the cache's ActivationStore, so on disk
// past the store's budget: experts x tokens x hidden is 13.4 GB a DeepSeekMoE-16B layer
// at 100 x 256 tokens), and a candidate's output is combined arithmetically,
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
import { hiddenKey, type LayerCache, xKey, xnKey } from "./layer_cache.ts";
import { condensedMlp, expertOutput, moeSpec, sharedOutput } from "./plan.ts";
import { layerPrefix } from "../model/config.ts";

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
  /** Fast search: of `seconds`, the time spent computing the experts' outputs. */
  outputSeconds?: number;
}

export interface ExpertSearchOptions {
  k: number;
  metric: Metric;
  /** avg_w of the layer's experts from the routing profile. */
  avgW: number[];
  /** Called after each candidate with (candidates done, total). */
  progress?: (done: number, total: number) => void;
  /** Fast search: called after each expert's outputs are computed, with (done, experts). */
  outputsProgress?: (done: number, total: number) => void;
  /**
   * Release weights once used: each expert's after its outputs (fast search), the layer's
   * at the end, so one layer (fast: one expert) is resident (naive: each forward's layers).
   */
  layerwise?: boolean;
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
  const store = cache.store;
  const x = await store.get(xKey(l)), xn = await store.get(xnKey(l));
  const batches = cache.batches;
  const ref = new Reference(opts.metric, H);
  // The layer's output (read here and then dropped: the Reference keeps what it needs), or
  // for the last layer its final norm.
  const target = layerTarget(model, l);
  const original = target ? cache.finalHidden : await store.get(hiddenKey(l + 1));
  for (const [bi, rows] of original.entries()) ref.add(rows, batches[bi].shape, batches[bi].ids);

  // Every expert once on the cached input, expert by expert (one expert's weights used at
  // a time): base = shared output, expert e's outputs on the device (a device scorer
  // whose store has no budget) or in the store.
  const device = opts.metric === "js-hidden" && hasDeviceDivergence(be) ? be : null;
  const onDevice = device !== null && store.budgetBytes === Infinity;
  const xt = xn.map((a) => be.tensor(a, [a.length / H, H]));
  const base: Tensor[] = [];
  for (const t of xt) base.push(await sharedOutput(model, l, t));
  const deviceOut: Tensor[][] = [];
  const outputs = (e: number) => `experts${l}.${e}`;
  try {
    for (let e = 0; e < E; e++) {
      const ys: Tensor[] = [];
      for (const t of xt) ys.push(await expertOutput(model, l, e, t));
      if (onDevice) deviceOut.push(ys);
      else {
        const values = await be.readAll(ys);
        ys.forEach((y) => be.free(y));
        await store.set(outputs(e), values);
      }
      if (opts.layerwise) {
        model.release(`${layerPrefix(l)}${model.spec.names.moeBlock}.experts.${e}.`);
      }
      opts.outputsProgress?.(e + 1, E);
    }
    xt.forEach((t) => be.free(t));
    const outputSeconds = (performance.now() - t0) / 1000;
    const upload = async (c: number) =>
      (await store.get(outputs(c))).map((v) => be.tensor(v, [v.length / H, H]));
    const scorer = device
      ? onDevice
        ? deviceScorer(device, ref, x, base, (c) => deviceOut[c], false, target)
        : deviceScorer(device, ref, x, base, upload, true, target)
      : await hostScorer(be, ref, x, base, (c) => store.get(outputs(c)), target);

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
        await scorer.accept(best, opts.avgW[best]);
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
      outputSeconds,
    };
  } finally {
    for (let e = 0; e < E; e++) store.delete(outputs(e));
    deviceOut.flat().forEach((t) => be.free(t));
    if (opts.layerwise) model.releaseLayer(l);
  }
}

/**
 * The fast search's candidates x + (base + w expert_c) and their per-document divergence,
 * and base += w expert_c for the chosen one, all with the same f32 operations in the same
 * order as the naive path.
 */
interface CandidateScorer {
  score(c: number, w: number): Promise<number[]>;
  accept(c: number, w: number): Promise<void>;
  free(): void;
}

/** On the host, any metric: the Reference's rows in f64; expert outputs from `expertOut`. */
async function hostScorer(
  be: Backend,
  ref: Reference,
  x: Float32Array[],
  baseTensors: Tensor[],
  expertOut: (c: number) => Promise<Float32Array[]>,
  target: ((h: Tensor) => Promise<Tensor>) | null,
): Promise<CandidateScorer> {
  const H = baseTensors[0].shape[1];
  const base = await be.readAll(baseTensors);
  baseTensors.forEach((t) => be.free(t));
  const scratch = x.map((xb) => new Float32Array(xb.length));
  return {
    async score(c, w) {
      const docMeans: number[] = [], out = await expertOut(c);
      for (let bi = 0; bi < x.length; bi++) {
        const cand = scratch[bi], xb = x[bi], bb = base[bi], eb = out[bi];
        // f32 like the backend: scale, add to the MLP sum, add to the residual.
        for (let i = 0; i < cand.length; i++) {
          cand[i] = xb[i] + Math.fround(bb[i] + Math.fround(w * eb[i]));
        }
        if (!target) docMeans.push(...ref.docMeans(bi, cand));
        else {
          const h = be.tensor(cand, [cand.length / H, H]);
          docMeans.push(...ref.docMeans(bi, await readTarget(be, target, h)));
          be.free(h);
        }
      }
      return docMeans;
    },
    async accept(c, w) {
      const out = await expertOut(c);
      for (let bi = 0; bi < x.length; bi++) {
        const bb = base[bi], eb = out[bi];
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
 * On the device (JS on a backend with jsDivergenceRows): each candidate is built by the
 * backend's scale and adds and scored by its JS kernel, and only one number a row comes
 * back. For a large model this is most of the search: about experts x k candidates a
 * layer, each over tokens x hidden entries. `expertOut` gives expert c's outputs on the
 * device: kept there, or (`uploaded`) uploaded from the store for the call, freed after it.
 */
function deviceScorer(
  be: Backend & DeviceDivergence,
  ref: Reference,
  x: Float32Array[],
  base: Tensor[],
  expertOut: (c: number) => Tensor[] | Promise<Tensor[]>,
  uploaded: boolean,
  target: ((h: Tensor) => Promise<Tensor>) | null,
): CandidateScorer {
  const H = base[0].shape[1];
  const xt = x.map((xb) => be.tensor(xb, [xb.length / H, H]));
  const p = x.map((_, bi) => be.tensor(ref.probs(bi), [x[bi].length / H, H]));
  const outputs = async (c: number, use: (out: Tensor[]) => Promise<void> | void) => {
    const out = await expertOut(c);
    try {
      await use(out);
    } finally {
      if (uploaded) out.forEach((t) => be.free(t));
    }
  };
  // base + w expert_c, as the host's fround(bb + fround(w eb))
  const withExpert = (bi: number, eb: Tensor, w: number) => {
    const scaled = be.scale(eb, w), sum = be.add(base[bi], scaled);
    be.free(scaled);
    return sum;
  };
  return {
    async score(c, w) {
      let perRow: Float32Array[] = [];
      await outputs(c, async (out) => {
        const js: Tensor[] = [];
        for (let bi = 0; bi < x.length; bi++) {
          const mlp = withExpert(bi, out[bi], w), cand = be.add(xt[bi], mlp);
          const compared = target ? await target(cand) : cand;
          js.push(be.jsDivergenceRows(p[bi], compared, JS_EPS));
          be.free(mlp), be.free(cand);
          if (compared !== cand) be.free(compared);
        }
        perRow = await be.readAll(js);
        js.forEach((t) => be.free(t));
      });
      return perRow.flatMap((rows, bi) => ref.meansOfRows(bi, rows));
    },
    async accept(c, w) {
      await outputs(c, (out) => {
        for (let bi = 0; bi < x.length; bi++) {
          const next = withExpert(bi, out[bi], w);
          be.free(base[bi]);
          base[bi] = next;
        }
      });
    },
    free() {
      for (const t of [...xt, ...p, ...base]) be.free(t);
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
