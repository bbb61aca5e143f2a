// Compressed-experts training: the backward (lib/train/backward.ts ceBackward) against
// central finite differences of the decoder's CE forward loss, for the ces vectors, the
// router (through the main weights and the aux alphas), a main expert and a tensor below
// the MoE block; plus finetune selections and a checkpoint round trip.

import assert from "node:assert";
import type { Tensor } from "../lib/backend/backend.ts";
import { CpuBackend, type CpuWeight } from "../lib/backend/cpu.ts";
import { cesName, type MlpSpec, type RenormOver } from "../lib/model/config.ts";
import { forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import { lossAndGrad } from "../lib/train/backward.ts";
import {
  ADAMW_DEFAULTS,
  Optimizer,
  selectTrainable,
  trainStep,
  writeTrainedCheckpoint,
} from "../lib/train/trainer.ts";
import { enableOnModel } from "../lib/methods/compressed_experts.ts";
import { loadCe, relMaxDiff } from "./ce_util.ts";
import {
  decoderLoss,
  finiteDifference,
  groupedVersusOneByOne,
  pinnedLoss,
  pinTopK,
  trainingBatch,
  zeroGrads,
} from "./train_fd.ts";
import { FIXTURE_ROOT } from "./golden.ts";

type Moe = Extract<MlpSpec, { kind: "moe" }>;
const SHAPE = trainingBatch(1).shape;

async function checkCe(
  fixture: string,
  km: number,
  names: string[],
  recompute: boolean,
  normalize = false,
  renormOver?: RenormOver,
) {
  // The plain loops, which sum in f64: finite differences divide the loss's f32 noise by
  // 2h, and on the BLAS path (8-row batches run as sgemv since it is faster for them) that
  // noise alone reached the tolerance for small gradients (post_attention_layernorm: 1.3e-2
  // there, 3.3e-3 here). The BLAS ops are checked against these loops and against finite
  // differences one by one (cpu_blas_test.ts, train_ops_test.ts).
  const be = new CpuBackend({ reference: true });
  const model = await loadCe(`${FIXTURE_ROOT}${fixture}`, be, km, 900, renormOver);
  // norm_topk_prob=true: w_m = p_m / (sum of the top-k or of the main experts' p)
  if (normalize) {
    for (const l of model.spec.layers) if (l.mlp.kind === "moe") l.mlp.renorm.normalize = true;
  }
  for (const n of names) model.makeTrainable(n);
  const batch = trainingBatch(model.spec.vocab), { ids, targets } = batch;
  const grads = await zeroGrads(model, names);
  const { loss } = await lossAndGrad(model, ids, targets, SHAPE, grads, { recompute });
  const pins = pinTopK(be);
  const base = await decoderLoss(model, ids, targets, SHAPE);
  pins.pin();
  assert(Math.abs(loss - base.loss) < 1e-5, `training loss ${loss} != decoder ${base.loss}`);
  let worst = 0;
  for (const n of names) {
    const data = (await model.weight(n) as CpuWeight).data;
    const g = await be.read(grads.get(n) as Tensor);
    const order = Array.from(g.keys()).sort((a, b) => Math.abs(g[b]) - Math.abs(g[a]));
    const entries = [...order.slice(0, 8), order[Math.floor(order.length / 2)], 0];
    // ces entries are O(1) (weights ~0.02): a larger step keeps f32 loss noise small. The
    // top-k choices are pinned (pinTopK), so no entry is lost to a routing flip.
    const h = n.endsWith(".ces") ? 5e-2 : 1e-2;
    const fd = await finiteDifference(data, () => pinnedLoss(model, batch, pins), h, entries);
    let gmax = 0;
    for (const v of g) gmax = Math.max(gmax, Math.abs(v));
    assert(gmax > 0, `${n}: zero gradient`);
    let err = 0;
    for (const [i, f] of fd) err = Math.max(err, Math.abs(f - g[i]) / gmax);
    worst = Math.max(worst, err);
    if (Deno.env.get("CE_FD_VERBOSE")) {
      console.log(`    ${n}: ${err.toExponential(2)} (max grad ${gmax.toExponential(2)})`);
    }
    assert(err < 1e-2, `${fixture} ${n}: FD error ${err}`);
  }
  pins.unpin();
  model.close();
  console.log(
    `  ${fixture} k_m=${km}${recompute ? " (recompute)" : ""}: max FD error ${
      worst.toExponential(2)
    }`,
  );
}

for (const recompute of [false, true]) {
  const tag = recompute ? " (recompute)" : "";
  Deno.test(`ce train: olmoe-a (top-4, k_m=2) grads vs FD${tag}`, async () => {
    await checkCe("olmoe-a", 2, [
      "model.layers.1.mlp.ces",
      "model.layers.0.mlp.ces",
      "model.layers.1.mlp.gate.weight",
      "model.layers.1.mlp.experts.3.up_proj.weight",
      "model.layers.1.post_attention_layernorm.weight",
    ], recompute);
  });
}
Deno.test("ce train: frozen main experts grouped give the gradients of experts one by one", async () => {
  await groupedVersusOneByOne(
    () => loadCe(`${FIXTURE_ROOT}olmoe-a`, new CpuBackend({ reference: true }), 2, 900),
    [
      "model.layers.0.mlp.ces",
      "model.layers.1.mlp.ces",
      "model.layers.1.mlp.gate.weight",
      "model.layers.0.self_attn.q_proj.weight",
    ],
    [0, 1],
  );
});

Deno.test("ce train: deepseek-a (shared experts, k_m=1) grads vs FD", async () => {
  await checkCe("deepseek-a", 1, [
    "model.layers.2.mlp.ces",
    "model.layers.2.mlp.gate.weight",
    "model.layers.2.mlp.shared_experts.up_proj.weight",
    "model.layers.1.mlp.experts.0.down_proj.weight",
  ], false);
});
// norm_topk_prob is true in qwen3_moe-a (as in the released Qwen3-MoE models): the main
// weight is renormalised over the main experts. Top-2 with k_m=1 makes it and the one aux
// alpha exactly 1, so the router has no gradient there (its path is checked above); a
// q/k norm and a projection lie below the MoE blocks.
Deno.test("ce train: qwen3_moe-a (renormalised, no shared expert, k_m=1) grads vs FD", async () => {
  await checkCe("qwen3_moe-a", 1, [
    "model.layers.1.mlp.ces",
    "model.layers.3.mlp.ces",
    "model.layers.2.mlp.experts.4.up_proj.weight",
    "model.layers.1.self_attn.k_norm.weight",
    "model.layers.2.self_attn.q_proj.weight",
  ], true);
});
// (its router gradient is ~5e-4, where FD of the f32 loss is too noisy to judge; the
// router path is checked on olmoe-a and deepseek-a)
Deno.test("ce train: qwen2_moe-a (gated shared) grads vs FD", async () => {
  await checkCe("qwen2_moe-a", 1, [
    "model.layers.1.mlp.ces",
    "model.layers.1.mlp.experts.5.gate_proj.weight",
    "model.layers.0.mlp.shared_expert_gate.weight",
  ], false);
});
// top-2, k_m=1: one aux (alpha = 1) and w = 1, so the router gets no gradient there
Deno.test("ce train: mixtral-a grads vs FD", async () => {
  await checkCe("mixtral-a", 1, [
    "model.layers.1.block_sparse_moe.ces",
    "model.layers.0.block_sparse_moe.experts.2.w1.weight",
  ], false);
});
for (const over of ["top_k", "main"] as const) {
  Deno.test(`ce train: olmoe-a with main weights renormalised over ${over}: grads vs FD`, async () => {
    await checkCe(
      "olmoe-a",
      2,
      ["model.layers.1.mlp.ces", "model.layers.1.mlp.gate.weight"],
      false,
      true,
      over,
    );
  });
}
// k_m = 1 of top-4 renormalised over the top-k (DeepSeek's eps 1e-20): the router gets
// gradient through the one main weight's divisor, aux experts included.
Deno.test("ce train: deepseek-a k_m=1 renormalised over the top-k: grads vs FD", async () => {
  await checkCe(
    "deepseek-a",
    1,
    ["model.layers.2.mlp.ces", "model.layers.2.mlp.gate.weight"],
    false,
    true,
  );
});
Deno.test("ce train: olmoe-a k_m=3 (one aux) and k_m=1 (three aux) grads vs FD", async () => {
  for (const km of [1, 3]) {
    await checkCe(
      "olmoe-a",
      km,
      ["model.layers.1.mlp.ces", "model.layers.1.mlp.gate.weight"],
      false,
    );
  }
});

Deno.test("ce train: selections, a few steps lower the loss, checkpoint round trip", async () => {
  // The plain loops, which sum in f64: finite differences divide the loss's f32 noise by
  // 2h, and on the BLAS path (8-row batches run as sgemv since it is faster for them) that
  // noise alone reached the tolerance for small gradients (post_attention_layernorm: 1.3e-2
  // there, 3.3e-3 here). The BLAS ops are checked against these loops and against finite
  // differences one by one (cpu_blas_test.ts, train_ops_test.ts).
  const be = new CpuBackend({ reference: true });
  const dir = `${FIXTURE_ROOT}olmoe-a`;
  const plain = await Model.load(dir, be);
  assert.throws(() => selectTrainable(plain, "ces"), /no compressed experts.*--main-experts/);
  plain.close();
  const model = await Model.load(dir, be);
  enableOnModel(model, 2, "--main-experts");
  const ces = selectTrainable(model, "ces");
  assert.deepEqual(ces, model.spec.layers.map((_, l) => cesName(model.spec, l)));
  const cesMain = selectTrainable(model, "ces+main");
  const moe = model.spec.layers[0].mlp as Moe;
  assert.equal(cesMain.length, ces.length + model.spec.numLayers * moe.experts * 3);
  assert(selectTrainable(model, "all").includes(ces[0]));

  const opt = await Optimizer.create(model, ces, {
    lr: 5e-2,
    schedule: "constant",
    warmup: 0,
    ...ADAMW_DEFAULTS,
    weightDecay: 0,
    clip: 1,
  });
  const batch = trainingBatch(model.spec.vocab), { ids } = batch;
  const losses: number[] = [];
  for (let s = 0; s < 5; s++) losses.push((await trainStep(opt, [batch], 5e-2, false)).loss);
  assert(losses[4] < losses[0], `loss did not fall: ${losses}`);
  const out = await Deno.makeTempDir();
  await writeTrainedCheckpoint(opt, `${out}/ce`, {});
  const before = await forward(model, ids, SHAPE);
  model.close();
  const reloaded = await Model.load(`${out}/ce`, be); // config now has compressed_experts
  assert.equal((reloaded.spec.layers[0].mlp as Moe).mainExperts, 2);
  const after = await forward(reloaded, ids, SHAPE);
  assert(relMaxDiff(after.logits, before.logits) < 1e-6);
  reloaded.close();
  await Deno.remove(out, { recursive: true });
});

Deno.test("ce train: finetune --main-experts 2 --trainable ces writes a CE checkpoint", async () => {
  const tmp = await Deno.makeTempDir();
  const script = new URL("../scripts/finetune.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      script,
      "--main-experts",
      "2",
      "--trainable",
      "ces",
      "--steps",
      "2",
      "--batch",
      "2",
      "--length",
      "32",
      "--lr",
      "1e-2",
      "--schedule",
      "cosine",
      "--out",
      `${tmp}/ce`,
      "--results",
      `${tmp}/results`,
    ],
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  const model = await Model.load(`${tmp}/ce`, new CpuBackend());
  assert.equal((model.spec.layers[1].mlp as Moe).mainExperts, 2);
  const ces = await model.rawTensor(cesName(model.spec, 1));
  assert.deepEqual(ces.shape, [16, 3, 256]);
  assert.equal(ces.dtype, "F32");
  model.close();
  const config = JSON.parse(await Deno.readTextFile(`${tmp}/ce/config.json`));
  assert.deepEqual(config.compressed_experts, { main_experts: 2, renorm_over: "top_k" });
  const badRenorm = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, "--main-experts", "2", "--renorm-over", "all", "--out", `${tmp}/y`],
  }).output();
  assert.notEqual(badRenorm.code, 0);
  assert.match(new TextDecoder().decode(badRenorm.stderr), /--renorm-over must be top_k or main/);
  const bad = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, "--main-experts", "4", "--trainable", "ces", "--out", `${tmp}/x`],
  }).output();
  assert.notEqual(bad.code, 0);
  assert.match(new TextDecoder().decode(bad.stderr), /--main-experts.*\[1, 3\]/);
  await Deno.remove(tmp, { recursive: true });
});
