// Incremental decoding with a KV cache: prefill the prompts once, then one token per
// step for the whole batch. Reuses the decoder's embed / runLayer / finalNorm / logitsOf;
// runLayer writes each layer's keys and values into the cache (decoder.ts KvCache).

import { argmaxRow, numelOf, readIds, type Tensor } from "../backend/backend.ts";
import {
  embed,
  finalNorm,
  forward,
  type FusedNorm,
  type KvCache,
  logitsOf,
  nextNorm,
  runLayer,
} from "./decoder.ts";
import type { Model } from "./model.ts";

export function createKvCache(model: Model, batch: number, capacity: number): KvCache {
  const s = model.spec, be = model.backend, width = s.kvHeads * s.headDim;
  const cache: KvCache = { batch, capacity, length: 0, k: [], v: [] };
  for (let l = 0; l < s.numLayers; l++) {
    // Layers without attention (BlockDrop) never touch their slot; keep it tiny.
    const rows = s.layers[l].attention ? batch * capacity : 1;
    cache.k.push(be.tensor(new Float32Array(rows * width), [rows, width]));
    cache.v.push(be.tensor(new Float32Array(rows * width), [rows, width]));
  }
  return cache;
}

export function freeKvCache(model: Model, cache: KvCache): void {
  for (const t of [...cache.k, ...cache.v]) model.backend.free(t);
  cache.k = [], cache.v = [];
}

/**
 * Run `seqLen` new tokens per sequence (ids [batch, seqLen], row-major: from the host, or
 * an id tensor of argmaxRows) at positions cache.length.., append them to the cache and
 * return the logits tensor [batch * rows, vocab]: every new position, or with lastOnly
 * just the last one per sequence.
 */
export async function cachedLogits(
  model: Model,
  ids: Int32Array | Tensor,
  seqLen: number,
  cache: KvCache,
  lastOnly = false,
): Promise<Tensor> {
  const be = model.backend, shape = { batch: cache.batch, seqLen };
  const count = ids instanceof Int32Array ? ids.length : numelOf(ids.shape);
  if (count !== cache.batch * seqLen) {
    throw new Error(`cachedLogits: ${count} ids for batch ${cache.batch} x ${seqLen}`);
  }
  let h: Tensor = await embed(model, ids);
  let normed: Tensor | undefined; // h through the next layer's first norm (FusedNorm)
  for (let l = 0; l < model.spec.numLayers; l++) {
    const fuse: FusedNorm = { normed, next: await nextNorm(model, l) };
    const next = await runLayer(model, l, h, shape, {}, cache, fuse);
    be.free(h);
    h = next, normed = fuse.outNormed;
  }
  cache.length += seqLen;
  const hn = normed ?? await finalNorm(model, h);
  be.free(h);
  const last = lastOnly && seqLen > 1
    ? Int32Array.from({ length: cache.batch }, (_, b) => b * seqLen + seqLen - 1)
    : undefined;
  return await logitsOf(model, hn, last);
}

/** cachedLogits, read back. */
export async function forwardCached(
  model: Model,
  ids: Int32Array,
  seqLen: number,
  cache: KvCache,
  lastOnly = false,
): Promise<Float32Array> {
  const logits = await cachedLogits(model, ids, seqLen, cache, lastOnly);
  const out = (await model.backend.read(logits)).slice();
  model.backend.free(logits);
  return out;
}

export interface GreedyOptions {
  maxNewTokens: number;
  /** Called after each step with a sequence's generated tokens; true stops that sequence. */
  shouldStop?: (seq: number, generated: number[]) => boolean;
  /** Receives each step's last-position logits [batch, vocab] (tests compare them). */
  onStepLogits?: (step: number, logits: Float32Array) => void;
}

/**
 * Greedy decoding with the KV cache after a prefill whose last-position logits [batch,
 * vocab] are `logits` (freed here): up to `steps` tokens a sequence, handed to `onTokens`
 * step by step until it returns true. Each step's argmax stays on the device as the next
 * step's input, and the next step is recorded and submitted before this one's tokens are
 * awaited, so on WebGPU the device runs one step while the host records the next and
 * never waits for the host's reading. Stopping therefore costs one step thrown away.
 */
export async function greedyDecode(
  model: Model,
  cache: KvCache,
  logits: Tensor,
  steps: number,
  onTokens: (step: number, tokens: Int32Array) => boolean,
  onStepLogits?: (step: number, logits: Float32Array) => void,
): Promise<void> {
  const be = model.backend;
  if (steps < 1) return be.free(logits);
  // An LM head wider than the embedding could name a row the embedding lacks: the ids
  // then go through the host, where embedding checks them.
  const [headRows] = (await model.weight(model.lmHeadName())).shape;
  const onDevice = headRows <= (await model.weight("model.embed_tokens.weight")).shape[0];
  const argmax = async (step: number, logits: Tensor) => {
    if (onStepLogits) onStepLogits(step, (await be.read(logits)).slice());
    const ids = be.argmaxRows(logits);
    be.free(logits);
    return ids;
  };
  // A step's ids on the device, and their read: started at once (it submits the step);
  // awaited a step later, with a no-op catch so a throw in between leaves no unhandled read.
  const submitted = (ids: Tensor) => {
    const tokens = readIds(be, ids);
    tokens.catch(() => {});
    return { ids, tokens };
  };
  let current = submitted(await argmax(0, logits));
  for (let step = 0; step < steps; step++) {
    let next: ReturnType<typeof submitted> | null = null;
    try {
      if (step + 1 < steps) {
        const input = onDevice ? current.ids : await current.tokens;
        next = submitted(await argmax(step + 1, await cachedLogits(model, input, 1, cache, true)));
      }
      const stop = onTokens(step, await current.tokens);
      if (stop || !next) {
        if (next) be.free(next.ids);
        return;
      }
    } catch (e) {
      if (next) be.free(next.ids);
      throw e;
    } finally {
      be.free(current.ids);
    }
    current = next;
  }
}

/**
 * Greedy decoding of equal-length prompts with the KV cache (greedyDecode). Sequences that
 * stopped keep being fed (their outputs are ignored) so the batch stays rectangular.
 */
export async function greedyGenerate(
  model: Model,
  prompts: number[][],
  opts: GreedyOptions,
): Promise<number[][]> {
  const batch = prompts.length, promptLen = prompts[0].length;
  if (prompts.some((p) => p.length !== promptLen)) {
    throw new Error("greedyGenerate: prompts in one batch must have the same length");
  }
  const cache = createKvCache(model, batch, promptLen + opts.maxNewTokens);
  const generated: number[][] = prompts.map(() => []);
  const done = new Array(batch).fill(false);
  try {
    const ids = Int32Array.from(prompts.flat());
    const logits = await cachedLogits(model, ids, promptLen, cache, true);
    await greedyDecode(model, cache, logits, opts.maxNewTokens, (_, tokens) => {
      for (let b = 0; b < batch; b++) {
        if (done[b]) continue;
        generated[b].push(tokens[b]);
        if (opts.shouldStop?.(b, generated[b])) done[b] = true;
      }
      return done.every((d) => d);
    }, opts.onStepLogits);
  } finally {
    freeKvCache(model, cache);
  }
  return generated;
}

/** The same greedy decoding by recomputing the whole sequence each step (reference for tests). */
export async function greedyGenerateNoCache(
  model: Model,
  prompts: number[][],
  opts: GreedyOptions,
): Promise<number[][]> {
  const batch = prompts.length, vocab = model.spec.vocab;
  const seqs = prompts.map((p) => p.slice());
  const generated: number[][] = prompts.map(() => []);
  const done = new Array(batch).fill(false);
  for (let step = 0; step < opts.maxNewTokens; step++) {
    const seqLen = seqs[0].length;
    const { logits } = await forward(model, Int32Array.from(seqs.flat()), { batch, seqLen });
    const last = new Float32Array(batch * vocab);
    for (let b = 0; b < batch; b++) {
      last.set(
        logits.subarray((b * seqLen + seqLen - 1) * vocab, (b * seqLen + seqLen) * vocab),
        b * vocab,
      );
    }
    opts.onStepLogits?.(step, last);
    for (let b = 0; b < batch; b++) {
      const next = argmaxRow(last, b, vocab);
      seqs[b].push(next);
      if (done[b]) continue;
      generated[b].push(next);
      if (opts.shouldStop?.(b, generated[b])) done[b] = true;
    }
    if (done.every((d) => d)) break;
  }
  return generated;
}
