// The whole-model backward (lib/train/backward.ts) against central finite differences of
// the loss computed by the ordinary decoder forward (its top-k choices pinned: see
// pinTopK), on the f32 golden fixtures, for a handful of entries in every kind of tensor:
// routed expert, shared expert, attention, norms, router (through the selected weights),
// gated shared expert, tied embedding.
import assert from "node:assert";
import type { Tensor } from "../lib/backend/backend.ts";
import { CpuBackend, type CpuWeight } from "../lib/backend/cpu.ts";
import { Model } from "../lib/model/model.ts";
import { lossAndGrad } from "../lib/train/backward.ts";
import { selectTrainable } from "../lib/train/trainer.ts";
import {
  type Condensed,
  condensedCheckpoint,
  decoderLoss,
  finiteDifference,
  groupedVersusOneByOne,
  pinnedLoss,
  pinTopK,
  trainingBatch,
  zeroGrads,
} from "./train_fd.ts";
import { randn } from "./util.ts";

const FIXTURES = new URL("./fixtures/hf-golden/", import.meta.url).pathname;
// The fixtures' weights are ~0.02 and their gradients ~1e-3, so a small step drowns in the
// f32 rounding of the loss (~1e-7 of 5.5): a step of 1e-2 keeps that noise near 1e-3 relative.
const H = 1e-2;
const VERBOSE = Deno.env.get("TRAIN_FD_VERBOSE") === "1";

/**
 * `fixture`: a fixture's name, or the path of a checkpoint folder. `perturbed` weights are set to 1 + 0.2 N(0, 1) first (norm weights, which the
 * unperturbed fixtures hold at exactly 1 and would hide a wrong index with).
 */
async function checkModel(
  fixture: string,
  names: string[],
  recompute: boolean,
  perturbed: string[] = [],
) {
  const be = new CpuBackend();
  const model = await Model.load(fixture.startsWith("/") ? fixture : `${FIXTURES}${fixture}`, be);
  for (const [i, n] of perturbed.entries()) {
    const data = (await model.weight(n) as CpuWeight).data;
    const noise = randn(data.length, 70 + i, 0.2);
    for (let j = 0; j < data.length; j++) data[j] = 1 + noise[j];
  }
  for (const n of names) model.makeTrainable(n);
  const batch = trainingBatch(model.spec.vocab), { ids, targets, shape } = batch;
  const grads = await zeroGrads(model, names);
  const { loss } = await lossAndGrad(model, ids, targets, shape, grads, { recompute });
  const pins = pinTopK(be);
  const base = await decoderLoss(model, ids, targets, shape);
  pins.pin();
  assert(
    Math.abs(loss - base.loss) < 1e-5,
    `training forward loss ${loss} != decoder ${base.loss}`,
  );
  const errors: string[] = [];
  let worst = 0;
  for (const n of names) {
    const data = (await model.weight(n) as CpuWeight).data;
    const g = await be.read(grads.get(n) as Tensor);
    // the 10 largest-gradient entries (clear signal) plus 2 fixed others
    const order = Array.from(g.keys()).sort((a, b) => Math.abs(g[b]) - Math.abs(g[a]));
    const entries = [...order.slice(0, 10), order[Math.floor(order.length / 2)], 0];
    // The top-k choices are pinned (pinTopK): a step that would flip a near-tied choice
    // (the loss jumps there) leaves it, so every entry is usable.
    // Large gradients (embedding, v_proj: ~0.1-0.6) carry little relative noise; there
    // the step's curvature term dominates (embedding 5.9e-3 at 1e-2, 3.8e-4 at 2.5e-3).
    let gmax = 0;
    for (const v of g) gmax = Math.max(gmax, Math.abs(v));
    const h = gmax > 0.1 ? H / 4 : H;
    const fd = await finiteDifference(data, () => pinnedLoss(model, batch, pins), h, entries);
    let err = 0;
    for (const [i, f] of fd) err = Math.max(err, Math.abs(f - g[i]) / gmax);
    worst = Math.max(worst, err);
    if (VERBOSE) {
      console.log(
        `${fixture} ${n}: max |grad| ${gmax.toExponential(2)}, FD error ${err.toExponential(2)}`,
      );
    }
    if (err > 1e-2) errors.push(`${n}: ${err}`);
  }
  pins.unpin();
  model.close();
  assert.deepStrictEqual(errors, [], `FD mismatches: ${errors.join(", ")}`);
  return worst;
}

Deno.test("train model: deepseek-a gradient vs FD of the decoder loss (tape)", async () => {
  await checkModel("deepseek-a", [
    "model.layers.1.mlp.experts.3.gate_proj.weight",
    "model.layers.2.mlp.experts.0.down_proj.weight",
    "model.layers.2.mlp.shared_experts.up_proj.weight",
    "model.layers.1.mlp.gate.weight",
    "model.layers.2.self_attn.q_proj.weight",
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.3.self_attn.v_proj.weight",
    "model.layers.3.self_attn.o_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.2.input_layernorm.weight",
    "model.layers.3.post_attention_layernorm.weight",
    "model.norm.weight",
    "model.embed_tokens.weight",
  ], false);
});

Deno.test("train model: qwen2_moe-a gradient vs FD (gated shared expert, recompute)", async () => {
  await checkModel("qwen2_moe-a", [
    "model.layers.0.mlp.shared_expert_gate.weight",
    "model.layers.1.mlp.shared_expert.down_proj.weight",
    "model.layers.1.mlp.experts.2.up_proj.weight",
    "model.layers.2.mlp.gate.weight",
    "model.layers.1.self_attn.q_proj.bias",
    "model.layers.2.self_attn.k_proj.weight",
  ], true);
});

Deno.test("train model: olmoe-a gradient vs FD through the whole-projection q/k norm", async () => {
  // clip_qkv is off here; tests/clip_qkv_test.ts checks it with steps that cross no bound.
  await checkModel("olmoe-a", [
    "model.layers.0.self_attn.q_norm.weight",
    "model.layers.1.self_attn.k_norm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.layers.1.mlp.experts.3.gate_proj.weight",
    "model.layers.0.mlp.gate.weight",
  ], false);
});

Deno.test("train model: qwen3_moe-a gradient vs FD through the per-head q/k norm", async () => {
  const norms = [0, 1, 2, 3].flatMap((l) =>
    ["q", "k"].map((x) => `model.layers.${l}.self_attn.${x}_norm.weight`)
  );
  await checkModel(
    "qwen3_moe-a",
    [
      "model.layers.0.self_attn.q_norm.weight",
      "model.layers.1.self_attn.k_norm.weight",
      "model.layers.0.self_attn.q_proj.weight",
      "model.layers.2.self_attn.k_proj.weight",
      "model.layers.1.self_attn.v_proj.weight",
      "model.layers.3.self_attn.o_proj.weight",
      "model.layers.1.mlp.experts.3.gate_proj.weight",
      "model.layers.2.mlp.gate.weight",
      "lm_head.weight",
    ],
    false,
    norms,
  );
});

// Condensed checkpoints as condense.ts writes them, trained as finetune.ts's default
// ("condensed"): the dense MLP of shared + kept experts with wbar folded in, and on Qwen
// the sigmoid-gated shared expert beside it (layer 0) or alone (layer 1: no expert kept,
// width 0); gradients also flow through them to the attention below and a router above.
const CONDENSED: { fixture: string; kept: Condensed; names: string[]; recompute: boolean }[] = [
  {
    fixture: "qwen2_moe-a",
    kept: [[0, [2, 5], [0.3, 0.2]], [1, [], []]],
    names: [
      "model.layers.0.mlp.gate_proj.weight",
      "model.layers.0.mlp.up_proj.weight",
      "model.layers.0.mlp.down_proj.weight",
      "model.layers.0.mlp.shared_expert.gate_proj.weight",
      "model.layers.0.mlp.shared_expert.down_proj.weight",
      "model.layers.0.mlp.shared_expert_gate.weight",
      "model.layers.1.mlp.shared_expert.up_proj.weight",
      "model.layers.1.mlp.shared_expert_gate.weight",
      "model.layers.0.self_attn.q_proj.weight",
      "model.layers.2.mlp.gate.weight",
    ],
    recompute: true,
  },
  {
    fixture: "deepseek-a",
    kept: [[2, [3, 7], [0.25, 0.15]], [3, [], []]],
    names: [
      "model.layers.2.mlp.gate_proj.weight",
      "model.layers.2.mlp.up_proj.weight",
      "model.layers.2.mlp.down_proj.weight",
      "model.layers.3.mlp.down_proj.weight",
      "model.layers.1.self_attn.v_proj.weight",
      "model.layers.1.mlp.gate.weight",
    ],
    recompute: false,
  },
];

for (const { fixture, kept, names, recompute } of CONDENSED) {
  Deno.test(`train model: a condensed ${fixture} checkpoint's gradient vs FD`, async () => {
    const dir = await condensedCheckpoint(`${FIXTURES}${fixture}`, kept);
    const model = await Model.load(dir, new CpuBackend());
    const condensed = selectTrainable(model, "condensed");
    model.close();
    for (const n of names) {
      if (n.includes(".mlp.gate.") || n.includes("self_attn")) continue;
      assert(condensed.includes(n), `${n} is not in --trainable condensed: ${condensed}`);
    }
    await checkModel(dir, names, recompute);
    await Deno.remove(dir.slice(0, dir.lastIndexOf("/")), { recursive: true });
  });
}

// deepseek-a's layers 1-3 are MoE. None of these tensors is a routed expert, so every MoE
// layer runs its frozen experts grouped from the stacks (groupedExpertsForward/Backward);
// the gradients pass through them to the attention below and to the router.
const BELOW_FROZEN_EXPERTS = [
  "model.layers.1.self_attn.q_proj.weight",
  "model.layers.1.post_attention_layernorm.weight",
  "model.layers.2.mlp.gate.weight",
  "model.layers.3.mlp.shared_experts.down_proj.weight",
];

Deno.test("train model: gradients through frozen grouped experts vs FD", async () => {
  await checkModel("deepseek-a", BELOW_FROZEN_EXPERTS, false);
});

Deno.test("train model: frozen experts grouped give the gradients of experts one by one", async () => {
  await groupedVersusOneByOne(
    () => Model.load(`${FIXTURES}deepseek-a`, new CpuBackend({ reference: true })),
    BELOW_FROZEN_EXPERTS,
    [1, 2, 3],
  );
});

Deno.test("train model: tape and recompute modes give identical loss and gradients", async () => {
  for (const fixture of ["deepseek-a", "qwen2_moe-a", "olmoe-a", "qwen3_moe-a"]) {
    const results = [];
    for (const recompute of [false, true]) {
      const be = new CpuBackend({ reference: true });
      const model = await Model.load(`${FIXTURES}${fixture}`, be);
      const names = [...model.ckpt.files.keys()];
      for (const n of names) model.makeTrainable(n);
      const { ids, targets, shape } = trainingBatch(model.spec.vocab);
      const grads = await zeroGrads(model, names);
      const { loss } = await lossAndGrad(model, ids, targets, shape, grads, { recompute });
      const read = await Promise.all(names.map(async (n) => [n, await be.read(grads.get(n)!)]));
      results.push({ loss, grads: Object.fromEntries(read) });
      model.close();
    }
    assert.strictEqual(results[1].loss, results[0].loss, `${fixture}: loss`);
    assert.deepStrictEqual(results[1].grads, results[0].grads, `${fixture}: gradients`);
  }
});

Deno.test("a model in training frees its stacks and runs from its own weights or frozen experts' stacks, one copy each", async () => {
  for (const fixture of ["deepseek-a", "olmoe-a"]) {
    const model = await Model.load(`${FIXTURES}${fixture}`, new CpuBackend());
    const { ids, targets, shape } = trainingBatch(model.spec.vocab);
    const stacked = await decoderLoss(model, ids, targets, shape); // inference: from the stacks
    assert(model.stacking && model.residentBytes > 0);
    const trained = "model.layers.1.self_attn.q_proj.weight";
    model.makeTrainable(trained);
    assert(!model.stacking);
    // The stacks went: afterwards the model holds the plain weights once (the frozen
    // routed experts in their stacks, rebuilt), as a model that never stacked does.
    const unstacked = await decoderLoss(model, ids, targets, shape);
    assert(Math.abs(unstacked.loss - stacked.loss) < 1e-5, `${fixture}: ${unstacked.loss}`);
    const fresh = await Model.load(`${FIXTURES}${fixture}`, new CpuBackend());
    fresh.makeTrainable(trained);
    await decoderLoss(fresh, ids, targets, shape);
    assert.equal(model.residentBytes, fresh.residentBytes, `${fixture}: resident bytes`);
    model.close(), fresh.close();
  }
});
