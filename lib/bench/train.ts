// The train section: training tokens/s (forward + backward + AdamW, routed and shared experts
// trainable) per backend; on WebGPU also a step's submits and dispatches.

import { type Backend, supportsTraining } from "../backend/backend.ts";
import { WebGpuBackend } from "../backend/webgpu/mod.ts";
import { Model } from "../model/model.ts";
import { ADAMW_DEFAULTS, Optimizer, selectTrainable, trainStep } from "../train/trainer.ts";
import { type BenchSection, timeIt } from "./common.ts";

// What trains: every expert (routed experts one by one on their f32 master copies), or
// the routed experts frozen as in CD-MoE fine-tuning, where the MoE layers left run their
// experts grouped from the stacks and only pass gradients through them (o_proj in every
// architecture, plus the shared experts where there are some).
const TRAIN_SETS = [
  { trainable: "experts", label: "experts" },
  {
    trainable: "/\\.(self_attn\\.o_proj|mlp\\.shared_experts?\\.[a-z_]+)\\.weight$/",
    label: "routed experts frozen",
  },
];

async function benchTrain(backends: Map<string, Backend>, modelDir: string, repeats: number) {
  const rows: Record<string, unknown>[] = [];
  for (const [name, be] of backends) {
    if (!supportsTraining(be)) continue;
    for (const set of TRAIN_SETS) rows.push(await benchTrainSet(name, be, modelDir, repeats, set));
  }
  return rows;
}

async function benchTrainSet(
  name: string,
  be: Backend,
  modelDir: string,
  repeats: number,
  set: (typeof TRAIN_SETS)[number],
) {
  // One optimizer step on 8 x 256 tokens; the plain loops and the software GPU get 1 x 128.
  const batch = name === "cpu" ? 8 : 1, seqLen = name === "cpu" ? 256 : 128;
  const model = await Model.load(modelDir, be);
  const opt = await Optimizer.create(model, selectTrainable(model, set.trainable), {
    lr: 1e-5,
    schedule: "constant",
    warmup: 0,
    ...ADAMW_DEFAULTS,
    weightDecay: 0,
    clip: 1,
  });
  const ids = new Int32Array(batch * seqLen).map((_, i) => (i * 7919 + 13) % 256);
  const targets = ids.map((_, i) => ids[(i + 1) % ids.length]);
  const step = () => trainStep(opt, [{ ids, targets, shape: { batch, seqLen } }], 1e-5, false);
  const s = await timeIt(name === "cpu" ? repeats : 1, async () => void await step());
  // WebGPU: the waits on the device (submits) and dispatches of one more step.
  const gpu = be instanceof WebGpuBackend ? be : null;
  const [submits0, dispatches0] = gpu ? [gpu.submits, gpu.dispatches] : [0, 0];
  if (gpu) await step();
  const submitsPerStep = gpu && gpu.submits - submits0;
  const dispatchesPerStep = gpu && gpu.dispatches - dispatches0;
  model.close();
  console.error(
    `train ${name} ${batch}x${seqLen} (${set.label}): ${((batch * seqLen) / s).toFixed(0)} tok/s` +
      (gpu ? `, per step ${submitsPerStep} submits, ${dispatchesPerStep} dispatches` : ""),
  );
  return {
    backend: name,
    device: be.description,
    batch,
    seqLen,
    trainable: set.label,
    trainablePattern: set.trainable,
    trainableParams: opt.numParams,
    seconds: s,
    tokensPerSecond: (batch * seqLen) / s,
    submitsPerStep,
    dispatchesPerStep,
  };
}

export const trainSection: BenchSection = {
  name: "train",
  async run({ backends, modelDir, repeats }) {
    return { train: await benchTrain(backends, modelDir, repeats) };
  },
};
