// Incremental decoding with a KV cache: prefill the prompts once, then one token per
// step for the whole batch. Reuses the decoder's embed / runLayer / finalNorm / readLogits;
// runLayer writes each layer's keys and values into the cache (decoder.ts KvCache).

import type { Tensor } from "../backend/backend.ts";
import {
  embed,
  finalNorm,
  forward,
  type FusedNorm,
  type KvCache,
  nextNorm,
  readLogits,
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
 * Run `seqLen` new tokens per sequence (ids [batch, seqLen], row-major) at positions
 * cache.length.., append them to the cache and return logits [batch * rows, vocab]:
 * every new position, or with lastOnly just the last one per sequence.
 */
export async function forwardCached(
  model: Model,
  ids: Int32Array,
  seqLen: number,
  cache: KvCache,
  lastOnly = false,
): Promise<Float32Array> {
  const be = model.backend, shape = { batch: cache.batch, seqLen };
  if (ids.length !== cache.batch * seqLen) {
    throw new Error(`forwardCached: ${ids.length} ids for batch ${cache.batch} x ${seqLen}`);
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
  return await readLogits(model, hn, last);
}

export function argmaxRow(logits: Float32Array, row: number, vocab: number): number {
  let best = 0, bestValue = -Infinity;
  for (let j = 0; j < vocab; j++) {
    const v = logits[row * vocab + j];
    if (v > bestValue) (bestValue = v), (best = j); // first max, like torch.argmax
  }
  return best;
}

export interface GreedyOptions {
  maxNewTokens: number;
  /** Called after each step with a sequence's generated tokens; true stops that sequence. */
  shouldStop?: (seq: number, generated: number[]) => boolean;
  /** Receives each step's last-position logits [batch, vocab] (tests compare them). */
  onStepLogits?: (step: number, logits: Float32Array) => void;
}

/**
 * Greedy decoding of equal-length prompts with the KV cache. Sequences that stopped keep
 * being fed (their outputs are ignored) so the batch stays rectangular.
 */
export async function greedyGenerate(
  model: Model,
  prompts: number[][],
  opts: GreedyOptions,
): Promise<number[][]> {
  const batch = prompts.length, promptLen = prompts[0].length, vocab = model.spec.vocab;
  if (prompts.some((p) => p.length !== promptLen)) {
    throw new Error("greedyGenerate: prompts in one batch must have the same length");
  }
  const cache = createKvCache(model, batch, promptLen + opts.maxNewTokens);
  const generated: number[][] = prompts.map(() => []);
  const done = new Array(batch).fill(false);
  try {
    let logits = await forwardCached(
      model,
      Int32Array.from(prompts.flat()),
      promptLen,
      cache,
      true,
    );
    for (let step = 0; step < opts.maxNewTokens; step++) {
      opts.onStepLogits?.(step, logits);
      const next = new Int32Array(batch);
      for (let b = 0; b < batch; b++) {
        next[b] = argmaxRow(logits, b, vocab);
        if (done[b]) continue;
        generated[b].push(next[b]);
        if (opts.shouldStop?.(b, generated[b])) done[b] = true;
      }
      if (done.every((d) => d) || step === opts.maxNewTokens - 1) break;
      logits = await forwardCached(model, next, 1, cache, true);
    }
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
