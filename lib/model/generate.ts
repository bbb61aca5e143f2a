// Incremental decoding with a KV cache: prefill the prompts once, then one token per
// step for the whole batch. Reuses the decoder's embed / runLayer / finalNorm / logitsOf;
// runLayer writes each layer's keys and values into the cache (decoder.ts KvCache).

import { argmaxRow, idsOf, numelOf, type Tensor } from "../backend/backend.ts";
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

// Steps whose tokens come back in one read on a device (WebGPU). In Deno 2.9.6 a read
// blocks the thread until the device has run everything submitted, then resolves no
// sooner than 10 ms later (mapAsync sleeps 10 ms between polls of the device), so a read
// a step held decoding near 100 steps/s however fast the device. A stop is then seen up
// to this many steps late. The CPU reads for free: a step a read.
const DEVICE_STEPS_PER_READ = 8;

/**
 * Greedy decoding with the KV cache after a prefill whose last-position logits [batch,
 * vocab] are `logits` (freed here): up to `steps` tokens a sequence, handed to `onTokens`
 * step by step until it returns true. Each step's argmax stays on the device as the next
 * step's input, and the tokens of DEVICE_STEPS_PER_READ steps come back in one read. A
 * chunk's read is awaited only once the next chunk is recorded and submitted, so its
 * 10 ms pass while the host records. Stopping costs the steps recorded past the stop,
 * which are thrown away.
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
  // then go through the host, where embedding checks them, a step at a time.
  const [headRows] = (await model.weight(model.lmHeadName())).shape;
  const onDevice = headRows <= (await model.weight("model.embed_tokens.weight")).shape[0];
  const perRead = be.name === "cpu" || onStepLogits || !onDevice ? 1 : DEVICE_STEPS_PER_READ;
  const live = new Set<Tensor>(); // id tensors not yet freed
  const argmax = async (step: number, logits: Tensor) => {
    if (onStepLogits) onStepLogits(step, (await be.read(logits)).slice());
    const ids = be.argmaxRows(logits);
    be.free(logits);
    live.add(ids);
    return ids;
  };
  // Consecutive steps' ids and their one read: started at once (it submits the steps),
  // awaited once the next steps are recorded, with a no-op catch so that a throw in
  // between leaves no unhandled read.
  interface Chunk {
    first: number;
    ids: Tensor[];
    tokens: Promise<Int32Array[]>;
  }
  const submit = (first: number, ids: Tensor[]): Chunk => {
    const tokens = be.readAll(ids).then((all) => all.map(idsOf));
    tokens.catch(() => {});
    return { first, ids, tokens };
  };
  /** Hands a chunk's tokens on step by step and frees its ids; true once asked to stop. */
  const report = async (chunk: Chunk) => {
    const all = await chunk.tokens;
    for (const ids of chunk.ids) be.free(ids), live.delete(ids);
    return all.some((tokens, i) => onTokens(chunk.first + i, tokens));
  };
  try {
    let newest = await argmax(0, logits), recorded = 1;
    let open = [newest]; // recorded steps whose read is not yet submitted
    let inFlight: Chunk | null = null; // submitted, not yet reported
    for (;;) {
      if (open.length === perRead || recorded === steps) {
        const chunk = submit(recorded - open.length, open);
        open = [];
        // this chunk is submitted: report the one before, whose wait has passed meanwhile
        if (inFlight && await report(inFlight)) return;
        inFlight = chunk;
        if (recorded === steps) return void await report(inFlight);
      }
      const input = onDevice ? newest : (await inFlight!.tokens)[0]; // one step a read
      newest = await argmax(recorded++, await cachedLogits(model, input, 1, cache, true));
      open.push(newest);
    }
  } finally {
    for (const ids of live) be.free(ids);
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
