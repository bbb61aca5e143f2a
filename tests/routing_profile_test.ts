// The routing profile (CD-MoE 1a: per MoE layer and expert the selection count, the sum
// and the mean of the routing weight) against an independent computation from the
// fixtures' reference router logits: softmax over all experts in f64, top-k, and each
// architecture's renormalisation written out here from the reference code (not taken
// from lib/model/config.ts).

import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { SafetensorsFile, toFloat32, toInt32 } from "../lib/io/safetensors.ts";
import { calibrationPass } from "../lib/methods/layer_cache.ts";
import { RoutingProfiler } from "../lib/methods/routing_profile.ts";
import { Model } from "../lib/model/model.ts";
import { FIXTURE_ROOT, FIXTURES } from "./golden.ts";

interface Expected {
  freq: number[];
  sumW: number[];
  avgW: number[];
}

/**
 * The weight each top-k expert gets, as the reference forward uses it: Mixtral always
 * renormalises over the k; Qwen2-MoE and OLMoE when norm_topk_prob; DeepSeek v1 when
 * norm_topk_prob and k > 1, dividing by the sum + 1e-20.
 */
function topKWeights(cfg: Record<string, unknown>, probs: number[], k: number) {
  const order = probs.map((p, e) => [p, e]).sort((a, b) => b[0] - a[0]).slice(0, k);
  const sum = order.reduce((a, [p]) => a + p, 0);
  const normalise = cfg.model_type === "mixtral" ||
    (cfg.model_type === "deepseek"
      ? cfg.norm_topk_prob === true && k > 1
      : cfg.norm_topk_prob === true);
  const denominator = cfg.model_type === "deepseek" ? sum + 1e-20 : sum;
  return order.map(([p, e]) => ({ e, w: normalise ? p / denominator : p }));
}

function expected(
  cfg: Record<string, unknown>,
  logits: Float32Array,
  experts: number,
  k: number,
): Expected {
  const freq = new Array(experts).fill(0), sumW = new Array(experts).fill(0);
  for (let t = 0; t < logits.length / experts; t++) {
    const row = Array.from(logits.subarray(t * experts, (t + 1) * experts));
    const max = Math.max(...row), exps = row.map((x) => Math.exp(x - max));
    const z = exps.reduce((a, b) => a + b, 0);
    for (const { e, w } of topKWeights(cfg, exps.map((x) => x / z), k)) {
      freq[e]++;
      sumW[e] += w;
    }
  }
  return { freq, sumW, avgW: freq.map((f, e) => (f > 0 ? sumW[e] / f : 0)) };
}

function num(cfg: Record<string, unknown>, ...keys: string[]): number {
  for (const key of keys) if (typeof cfg[key] === "number") return cfg[key] as number;
  throw new Error(`config has none of ${keys}`);
}

/**
 * Profile fixture `fixture`'s golden batch with the model in `modelDir` (config `cfg`) and
 * compare every MoE layer, or only the first.
 */
async function check(
  fixture: string,
  modelDir: string,
  cfg: Record<string, unknown>,
  onlyFirst = false,
) {
  const golden = await SafetensorsFile.open(`${FIXTURE_ROOT}${fixture}/golden.safetensors`);
  const model = await Model.load(modelDir, new CpuBackend());
  try {
    const raw = await golden.read("input_ids");
    const [batch, seqLen] = raw.shape;
    const profiler = new RoutingProfiler();
    await calibrationPass(
      model,
      [{ ids: toInt32(raw), shape: { batch, seqLen }, docIndex: [0, 1] }],
      profiler,
      {
        keepCache: false,
      },
    );
    const profile = profiler.result();
    const experts = num(cfg, "n_routed_experts", "num_experts", "num_local_experts");
    const k = num(cfg, "num_experts_per_tok");
    const moe = [...golden.tensors.keys()]
      .filter((n) => n.startsWith("router_logits_"))
      .map((n) => Number(n.slice("router_logits_".length)))
      .sort((a, b) => a - b);
    assert.deepStrictEqual(Object.keys(profile.layers).map(Number), moe, `${fixture}: MoE layers`);
    let worst = 0;
    for (const l of onlyFirst ? moe.slice(0, 1) : moe) {
      const want = expected(cfg, toFloat32(await golden.read(`router_logits_${l}`)), experts, k);
      const got = profile.layers[l];
      assert.strictEqual(got.tokens, batch * seqLen);
      assert.strictEqual(got.topK, k);
      assert.deepStrictEqual(got.freq, want.freq, `${fixture} layer ${l}: freq`);
      for (let e = 0; e < experts; e++) {
        // f32 routing from our own router logits (within ~1e-6 of the reference's).
        for (
          const [what, a, b] of [["sum_w", got.sum_w[e], want.sumW[e]], [
            "avg_w",
            got.avg_w[e],
            want.avgW[e],
          ]] as const
        ) {
          const err = Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);
          worst = Math.max(worst, err);
          assert(err <= 1e-5, `${fixture} layer ${l} expert ${e}: ${what} ${a} vs ${b}`);
        }
      }
    }
    return worst;
  } finally {
    golden.close();
    model.close();
  }
}

for (const fixture of FIXTURES) {
  Deno.test(`routing profile = reference router logits: ${fixture}`, async () => {
    const cfg = JSON.parse(await Deno.readTextFile(`${FIXTURE_ROOT}${fixture}/config.json`));
    const worst = await check(fixture, `${FIXTURE_ROOT}${fixture}`, cfg);
    console.log(`  worst relative error ${worst.toExponential(2)}`);
  });
}

// Every fixture has norm_topk_prob false (Mixtral renormalises regardless). With it set,
// the first MoE layer's router input is unchanged, so its golden logits still hold.
for (const fixture of ["deepseek-a", "qwen2_moe-a", "olmoe-a"]) {
  Deno.test(`routing profile = reference router logits: ${fixture} with norm_topk_prob`, async () => {
    const dir = await Deno.makeTempDir();
    try {
      const cfg = JSON.parse(await Deno.readTextFile(`${FIXTURE_ROOT}${fixture}/config.json`));
      cfg.norm_topk_prob = true;
      await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(cfg));
      await Deno.symlink(`${FIXTURE_ROOT}${fixture}/model.safetensors`, `${dir}/model.safetensors`);
      await check(fixture, dir, cfg, true);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}
