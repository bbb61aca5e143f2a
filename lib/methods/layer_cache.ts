// One pass of the original model over the calibration batches, layer by layer (all
// batches through layer l before layer l+1, so layer-wise mode keeps one layer's
// weights resident). It records what every later step reuses: the hidden state entering
// each layer, each MoE layer's residual-after-attention x and normed MLP input xn, the
// final normed hidden state, and the routing profile. Cached states live on the host, in
// an ActivationStore (spilled to disk past its memory budget).

import type { Routing, Tensor } from "../backend/backend.ts";
import { embed, finalNorm, lmHead } from "../model/decoder.ts";
import type { Model } from "../model/model.ts";
import { ActivationStore } from "./activations.ts";
import type { CalibrationBatch } from "./calibration.ts";
import { type LayerChange, moeLayerParts, moeSpec, runPlannedLayer } from "./plan.ts";
import { RoutingProfiler } from "./routing_profile.ts";

export interface LayerCache {
  batches: CalibrationBatch[];
  /**
   * Per batch: hiddenKey(l), the residual stream entering layer l (l = numLayers: the last
   * layer's output); per MoE layer xKey(l), the residual after attention, and xnKey(l), the
   * normed MLP input.
   */
  store: ActivationStore;
  /** Final normed hidden state per batch. */
  finalHidden: Float32Array[];
}

export const hiddenKey = (l: number) => `h${l}`;
export const xKey = (l: number) => `x${l}`;
export const xnKey = (l: number) => `xn${l}`;

export interface PassOptions {
  layerwise?: boolean;
  /** Where the cache goes (default: a store in memory without a budget). */
  store?: ActivationStore;
  /** Keep x/xn and the per-layer states (default true; the profile alone needs none). */
  keepCache?: boolean;
  /** Called after each layer with (layers done, total layers). */
  progress?: (done: number, total: number) => void;
  /** Called for each MoE layer and batch with its MLP input and routing (expert saliency). */
  onMoe?: (l: number, xn: Tensor, routing: Routing) => Promise<void>;
}

async function readCopy(model: Model, t: Tensor): Promise<Float32Array> {
  const a = (await model.backend.read(t)).slice();
  model.backend.free(t);
  return a;
}

export async function calibrationPass(
  model: Model,
  batches: CalibrationBatch[],
  profiler: RoutingProfiler | null,
  opts: PassOptions = {},
): Promise<LayerCache> {
  const be = model.backend, L = model.spec.numLayers;
  const store = opts.store ?? new ActivationStore();
  const cache: LayerCache = { batches, store, finalHidden: [] };
  let states: Float32Array[] = [];
  for (const b of batches) states.push(await readCopy(model, await embed(model, b.ids)));
  if (opts.layerwise) model.release("model.embed_tokens.");
  const keep = opts.keepCache ?? true;
  for (let l = 0; l < L; l++) {
    if (keep) await store.set(hiddenKey(l), states);
    const next: Float32Array[] = [];
    const isMoe = model.spec.layers[l].mlp.kind === "moe";
    const xs: Float32Array[] = [], xns: Float32Array[] = [];
    for (let bi = 0; bi < batches.length; bi++) {
      const b = batches[bi];
      const h = be.tensor(states[bi], [states[bi].length / model.spec.hidden, model.spec.hidden]);
      if (isMoe) {
        const mlp = moeSpec(model, l);
        let routed: Routing | undefined;
        const parts = await moeLayerParts(model, l, h, b.shape, async (logits, routing) => {
          routed = routing;
          profiler?.observe(l, mlp.experts, mlp.topK, routing, await be.read(logits));
        });
        if (opts.onMoe) await opts.onMoe(l, parts.xn, routed!);
        if (keep) {
          xs.push(await readCopy(model, parts.x));
          xns.push(await readCopy(model, parts.xn));
        } else be.free(parts.x), be.free(parts.xn);
        next.push(await readCopy(model, parts.out));
      } else {
        next.push(await readCopy(model, await runPlannedLayer(model, l, h, b.shape, undefined)));
      }
      be.free(h);
    }
    if (isMoe && keep) await store.set(xKey(l), xs), await store.set(xnKey(l), xns);
    if (opts.layerwise) model.releaseLayer(l);
    states = next;
    opts.progress?.(l + 1, L);
  }
  if (keep) {
    cache.finalHidden = await finalHiddenOf(model, states);
    await store.set(hiddenKey(L), states);
  }
  return cache;
}

export async function finalHiddenOf(model: Model, states: Float32Array[]): Promise<Float32Array[]> {
  const be = model.backend, H = model.spec.hidden;
  const out: Float32Array[] = [];
  for (const s of states) {
    const h = be.tensor(s, [s.length / H, H]);
    out.push(await readCopy(model, await finalNorm(model, h)));
    be.free(h);
  }
  return out;
}

export async function logitsOf(model: Model, finalHidden: Float32Array): Promise<Float32Array> {
  const H = model.spec.hidden;
  const h = model.backend.tensor(finalHidden, [finalHidden.length / H, H]);
  const logits = await readCopy(model, await lmHead(model, h));
  model.backend.free(h);
  return logits;
}

/**
 * Run layers start..L-1 on `states` (hidden entering `start`, per batch) under `plan`.
 * `keep` receives the states entering each later layer (for the layer-search cache).
 * `end` stops before that layer (default: run to the last layer).
 */
export async function runFrom(
  model: Model,
  batches: CalibrationBatch[],
  start: number,
  states: Float32Array[],
  plan: Map<number, LayerChange>,
  opts: PassOptions & {
    keep?: (l: number, states: Float32Array[]) => void | Promise<void>;
    end?: number;
  } = {},
): Promise<Float32Array[]> {
  const be = model.backend, H = model.spec.hidden, L = opts.end ?? model.spec.numLayers;
  for (let l = start; l < L; l++) {
    if (l > start) await opts.keep?.(l, states);
    const next: Float32Array[] = [];
    for (let bi = 0; bi < batches.length; bi++) {
      const h = be.tensor(states[bi], [states[bi].length / H, H]);
      next.push(
        await readCopy(model, await runPlannedLayer(model, l, h, batches[bi].shape, plan.get(l))),
      );
      be.free(h);
    }
    if (opts.layerwise) model.releaseLayer(l);
    states = next;
  }
  await opts.keep?.(L, states);
  return states;
}
