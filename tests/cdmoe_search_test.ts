// CD-MoE: the fast exact searches choose the same experts and layers with the same
// divergences as the naive reference procedure (a full forward per candidate), on the
// default model and on fixtures of other architectures.

import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { Model } from "../lib/model/model.ts";
import { moeLayers } from "../lib/model/config.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import {
  type CalibrationBatch,
  DEFAULT_CALIBRATION,
  loadCalibration,
  makeBatches,
} from "../lib/methods/calibration.ts";
import { calibrationPass } from "../lib/methods/layer_cache.ts";
import { RoutingProfiler } from "../lib/methods/routing_profile.ts";
import { expertSearchFast, expertSearchNaive } from "../lib/methods/expert_search.ts";
import {
  finalReference,
  layerCandidateCount,
  layerSearchFast,
  layerSearchNaive,
  type Variant,
} from "../lib/methods/layer_search.ts";
import type { Metric } from "../lib/methods/divergence.ts";
import type { LayerChange } from "../lib/methods/plan.ts";
import { forward } from "../lib/model/decoder.ts";
import { DEFAULT_MODEL, FIXTURE_ROOT } from "./golden.ts";

function close(a: number, b: number, what: string) {
  assert(Math.abs(a - b) <= 1e-6 * Math.max(1e-3, Math.abs(a)), `${what}: fast ${a} vs naive ${b}`);
}

/** Every candidate of every step: the same candidates, divergences within 1e-6 relative. */
function sameCandidates(
  fast: { candidates: Record<string, number> }[],
  naive: { candidates: Record<string, number> }[],
  what: string,
) {
  assert.strictEqual(fast.length, naive.length, `${what}: steps`);
  fast.forEach((st, i) => {
    const want = naive[i].candidates;
    assert.deepStrictEqual(Object.keys(st.candidates), Object.keys(want), `${what} step ${i}`);
    for (const [c, d] of Object.entries(st.candidates)) {
      assert(
        Math.abs(d - want[c]) <= 1e-6 * Math.abs(want[c]),
        `${what} step ${i} candidate ${c}: fast ${d} vs naive ${want[c]}`,
      );
    }
  });
}

/** Random token batches for fixtures (they ship no tokenizer). */
function randomBatches(vocab: number, docs: number, seqLen: number, seed: number) {
  let s = seed;
  const rand = () => (s = (s * 1103515245 + 12345) % 2147483648) / 2147483648;
  const ids = Array.from(
    { length: docs },
    () => Int32Array.from({ length: seqLen }, () => Math.floor(rand() * vocab)),
  );
  return makeBatches(ids, 2);
}

async function compare(
  model: Model,
  batches: CalibrationBatch[],
  k: number,
  variants: Variant[],
  metric: Metric = "js-hidden",
) {
  const profiler = new RoutingProfiler();
  const cache = await calibrationPass(model, batches, profiler);
  const profile = profiler.result();
  const moe = moeLayers(model.spec);
  const lists: Record<number, { order: number[]; wbar: number[] }> = {};
  for (const l of moe) {
    const avgW = profile.layers[l].avg_w;
    const fast = await expertSearchFast(model, cache, l, { k, metric: "js-hidden", avgW });
    const naive = await expertSearchNaive(model, batches, l, { k, metric: "js-hidden", avgW });
    assert.deepStrictEqual(fast.order, naive.order, `layer ${l} expert order`);
    sameCandidates(fast.steps, naive.steps, `layer ${l} experts`);
    lists[l] = fast;
  }
  // The naive reference comes from a plain forward; the fast one from the layer cache.
  const naiveFinal: Float32Array[] = [];
  for (const b of batches) {
    const r = await forward(model, b.ids, b.shape, { collectHidden: true });
    naiveFinal.push(r.hiddenStates![r.hiddenStates!.length - 1]);
  }
  const orders: Record<string, number[]> = {};
  for (const variant of variants) {
    const changeFor = (l: number): LayerChange =>
      variant === "sr"
        ? { kind: "condense", experts: lists[l].order, wbar: lists[l].wbar }
        : variant === "s"
        ? { kind: "condense", experts: [], wbar: [] }
        : { kind: variant };
    const opts = { layers: moe, n: moe.length, metric, changeFor };
    const ref = await finalReference(model, batches, cache.finalHidden, metric);
    // Progress: one call a candidate, counting the candidates scored so far.
    const calls: number[] = [];
    const fast = await layerSearchFast(model, cache, ref, {
      ...opts,
      progress: (done) => calls.push(done),
    });
    const total = layerCandidateCount(moe.length, moe.length);
    assert.deepStrictEqual(calls, Array.from({ length: total }, (_, i) => i + 1));
    // Resumed after its first step: the same steps, progress going on from the first
    // step's candidates.
    const resumedCalls: number[] = [];
    const resumed = await layerSearchFast(model, cache, ref, {
      ...opts,
      done: fast.slice(0, 1),
      progress: (done) => resumedCalls.push(done),
    });
    assert.deepStrictEqual(resumed.map((s) => s.layer), fast.map((s) => s.layer));
    const first = moe.length;
    assert.deepStrictEqual(
      resumedCalls,
      Array.from({ length: total - first }, (_, i) => first + i + 1),
    );
    const naive = await layerSearchNaive(
      model,
      batches,
      await finalReference(model, batches, naiveFinal, metric),
      opts,
    );
    assert.deepStrictEqual(fast.map((s) => s.layer), naive.map((s) => s.layer), `${variant} order`);
    fast.forEach((st, i) => close(st.divergence, naive[i].divergence, `${variant} step ${i}`));
    sameCandidates(fast, naive, `${variant} layers`);
    orders[variant] = fast.map((s) => s.layer);
  }
  return orders;
}

Deno.test("fast and naive CD-MoE search agree: default model (calibration text)", async () => {
  const model = await Model.load(DEFAULT_MODEL, new CpuBackend());
  const tok = await loadTokenizer(DEFAULT_MODEL);
  const calib = await loadCalibration(DEFAULT_CALIBRATION, tok, {
    docs: 2,
    maxLen: 8,
    bos: "auto",
    bosTokenId: model.spec.bosTokenId,
    batchSize: 2,
  });
  await compare(model, calib.batches, 1, ["sr", "blockdrop"]);
  model.close();
});

Deno.test("fast and naive CD-MoE search agree: deepseek-a (shared experts), k = top-k", async () => {
  // Every layer's every candidate, the last decoder layer (compared after the final norm,
  // as HF's hidden_states[L]) included.
  const model = await Model.load(`${FIXTURE_ROOT}deepseek-a`, new CpuBackend());
  const moe = moeLayers(model.spec);
  assert.strictEqual(moe.at(-1), model.spec.numLayers - 1);
  const k = (model.spec.layers[moe[0]].mlp as { topK: number }).topK;
  assert.strictEqual(k, 4);
  await compare(model, randomBatches(model.spec.vocab, 3, 10, 11), k, ["sr"]);
  model.close();
});

for (
  const [fixture, variants, metric] of [
    ["qwen2_moe-a", ["sr", "s"], "js-hidden"],
    ["mixtral-bf16", ["sr", "layerdrop"], "kl-logits"],
    ["olmoe-a", ["s"], "loss"],
    ["qwen3_moe-a", ["sr", "blockdrop"], "js-hidden"],
  ] as const
) {
  Deno.test(`fast and naive CD-MoE search agree: ${fixture} (${metric})`, async () => {
    const model = await Model.load(`${FIXTURE_ROOT}${fixture}`, new CpuBackend());
    const batches = randomBatches(model.spec.vocab, 3, 10, 7);
    await compare(model, batches, 2, [...variants], metric);
    model.close();
  });
}
