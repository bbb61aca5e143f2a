// Memory and speed of a model folder: weight bytes resident, peak process RSS, prefill
// and KV-cache decode tokens/s (warmed up, median of repeats), total and active
// parameters per token. Used by scripts/measure.ts and scripts/tables.ts.
//
// Active parameters per token (the MoE papers' convention, which also gives the default
// model's README figure 5,299,456): every parameter except the routed experts a token
// does not use, i.e. embeddings + attention + norms + dense / condensed MLPs + router +
// shared experts + top-k routed experts + lm_head. `active_compute` leaves out the input
// embedding table (a lookup, not a matmul); with tied embeddings lm_head counts once.
// Compressed-experts layers count k_m full experts plus 3 * d per aux expert (He et al.:
// OLMoE-1B-7B 1.28B -> 0.878B at k_m = 4, checked in tests/ce_params_test.ts).

import type { Backend } from "../backend/backend.ts";
import { cesWidth } from "../model/config.ts";
import { forward } from "../model/decoder.ts";
import { cachedLogits, createKvCache, freeKvCache, greedyDecode } from "../model/generate.ts";
import { Model } from "../model/model.ts";

export interface MeasureSettings {
  batch: number;
  prompt: number;
  decode: number;
  repeats: number;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b), m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Total / routed / active parameter counts from the checkpoint's tensor shapes. */
export function countParams(model: Model) {
  let total = 0, routed = 0, embedding = 0;
  const perExpert = new Map<number, number>(); // layer -> params of one routed expert
  for (const [name, file] of model.ckpt.files) {
    if (name.endsWith(".ces")) continue; // compressed experts: counted per layer below
    const n = file.tensors.get(name)!.shape.reduce((a, b) => a * b, 1);
    total += n;
    if (name === "model.embed_tokens.weight") embedding = n;
    const m = name.match(/^model\.layers\.(\d+)\.[^.]+\.experts\.(\d+)\./);
    if (m) {
      routed += n;
      if (m[2] === "0") perExpert.set(+m[1], (perExpert.get(+m[1]) ?? 0) + n);
    }
  }
  let activeRouted = 0;
  let compressed = 0;
  model.spec.layers.forEach((layer, l) => {
    if (layer.mlp.kind !== "moe") return;
    const km = layer.mlp.mainExperts;
    if (km === undefined) {
      activeRouted += layer.mlp.topK * (perExpert.get(l) ?? 0);
      return;
    }
    // Compressed experts (the paper's count): k_m full experts, and 3 * d scaling
    // entries for each of the k_a aux experts; all E * 3 * d vectors are stored.
    const d = cesWidth(model.spec, layer.mlp);
    activeRouted += km * (perExpert.get(l) ?? 0) + (layer.mlp.topK - km) * 3 * d;
    total += layer.mlp.experts * 3 * d;
    compressed += layer.mlp.experts * 3 * d;
  });
  const active = total - routed - compressed + activeRouted;
  // Tied embeddings are also the lm_head, so they stay in the compute count.
  const activeCompute = model.spec.tieEmbeddings ? active : active - embedding;
  return { total, routed_experts: routed, active, active_compute: activeCompute, embedding };
}

export async function measureModel(dir: string, backend: Backend, opts: MeasureSettings) {
  const model = await Model.load(dir, backend);
  let peakRss = Deno.memoryUsage().rss;
  const sample = () => (peakRss = Math.max(peakRss, Deno.memoryUsage().rss));
  // Make every weight resident: that is what inference needs.
  for (const name of model.ckpt.files.keys()) await model.weight(name);
  sample();
  const { batch, prompt, decode, repeats } = opts;
  const vocab = model.spec.vocab;
  const ids = Int32Array.from(
    { length: batch * prompt },
    (_, i) => (i * 7919 + 13) % Math.min(vocab, 256),
  );

  const prefillTimes: number[] = [], decodeTimes: number[] = [];
  for (let r = 0; r <= repeats; r++) {
    let t0 = performance.now();
    await forward(model, ids, { batch, seqLen: prompt });
    const prefill = performance.now() - t0;
    sample();
    // Decode: prefill into a cache (untimed: its logits are read), then `decode` greedy
    // single-token steps as generation runs them (greedyDecode).
    const cache = createKvCache(model, batch, prompt + decode);
    const logits = await cachedLogits(model, ids, prompt, cache, true);
    await backend.read(logits);
    t0 = performance.now();
    await greedyDecode(model, cache, logits, decode + 1, () => false);
    const dec = performance.now() - t0;
    sample();
    freeKvCache(model, cache);
    if (r > 0) prefillTimes.push(prefill), decodeTimes.push(dec); // r = 0 is the warm-up
  }
  const result = {
    model: dir,
    device: backend.description,
    params: countParams(model),
    weight_bytes_resident: model.residentBytes,
    weight_bytes_on_disk: [...new Set(model.ckpt.files.values())].reduce(
      (s, f) => s + fileBytes(f),
      0,
    ),
    peak_rss_bytes: peakRss,
    prefill_tokens_per_s: (batch * prompt) / (median(prefillTimes) / 1000),
    decode_tokens_per_s: (batch * decode) / (median(decodeTimes) / 1000),
    prefill_ms: prefillTimes,
    decode_ms: decodeTimes,
  };
  model.close();
  return result;
}

function fileBytes(f: unknown): number {
  const path = (f as { path?: string }).path;
  try {
    return path ? Deno.statSync(path).size : 0;
  } catch {
    return 0;
  }
}

/** Bytes of every weight tensor in the checkpoint (its dtype, headers excluded). */
export function weightBytes(model: Model): number {
  let bytes = 0;
  for (const [name, file] of model.ckpt.files) {
    const t = file.tensors.get(name)!;
    bytes += t.end - t.begin;
  }
  return bytes;
}

/**
 * Prefill tokens/s of several model folders, measured in interleaved rounds: each round
 * loads every model (untimed), runs one warm-up forward and one timed forward. Timing
 * model after model lets JIT warm-up and machine load drift into the ratios (seen here:
 * the same model measured first and last differed 1.7x); rounds spread that drift over
 * all of them. Returns the median per model.
 */
export async function prefillRounds(
  dirs: string[],
  backend: Backend,
  opts: { batch: number; prompt: number; rounds: number },
): Promise<number[]> {
  const times: number[][] = dirs.map(() => []);
  for (let r = 0; r < opts.rounds; r++) {
    for (const [i, dir] of dirs.entries()) {
      const model = await Model.load(dir, backend);
      const ids = Int32Array.from(
        { length: opts.batch * opts.prompt },
        (_, j) => (j * 7919 + 13) % Math.min(model.spec.vocab, 256),
      );
      const shape = { batch: opts.batch, seqLen: opts.prompt };
      await forward(model, ids, shape);
      const t0 = performance.now();
      await forward(model, ids, shape);
      times[i].push((performance.now() - t0) / 1000);
      model.close();
    }
  }
  return times.map((t) => (opts.batch * opts.prompt) / median(t));
}
