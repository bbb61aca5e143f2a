// scripts/finetune.ts end to end on the shipped tiny model (small shapes): bad input
// gives one clear error line, non-zero exit and no output; a run killed mid-way and
// rerun gives the same checkpoint bytes as an uninterrupted run; the output loads.
import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { Model } from "../lib/model/model.ts";
import { enableOnModel } from "../lib/methods/compressed_experts.ts";
import {
  ADAMW_DEFAULTS,
  decays,
  learningRate,
  Optimizer,
  type Schedule,
  shuffledOrder,
} from "../lib/train/trainer.ts";

const SCRIPT = new URL("../scripts/finetune.ts", import.meta.url).pathname;
const SMALL = [
  "--trainable",
  "model.layers.5.mlp.shared_experts.*",
  "--length",
  "24",
  "--batch",
  "2",
  "--micro-batch",
  "1",
  "--lr",
  "1e-3",
];

async function finetune(args: string[]) {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", SCRIPT, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: r.code, stderr: new TextDecoder().decode(r.stderr) };
}

Deno.test("finetune: bad input is a one-line error, exit 1, nothing written", async () => {
  const dir = await Deno.makeTempDir();
  const empty = `${dir}/empty.jsonl`;
  await Deno.writeTextFile(empty, '{"instances": [{"text": ""}]}\n');
  const cases: [string[], RegExp][] = [
    [["--trainable", "no.such.tensor.*"], /matches no tensor/],
    [["--lr", "0"], /--lr must be a positive number/],
    [["--batch=-2"], /--batch must be a positive integer/],
    [["--data", empty], /no "instances" entry has a non-empty "text"/],
  ];
  for (const [args, message] of cases) {
    const out = `${dir}/out`;
    const r = await finetune([...SMALL, "--out", out, "--results", dir, ...args]);
    assert.strictEqual(r.code, 1, r.stderr);
    assert.match(r.stderr, message);
    assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
    await assert.rejects(Deno.stat(out));
  }
  await Deno.remove(dir, { recursive: true });
});

Deno.test("finetune: killed and rerun equals one uninterrupted run; a foreign state file is refused", async () => {
  const dir = await Deno.makeTempDir();
  const common = [...SMALL, "--steps", "4", "--save-every", "1", "--results", dir];
  const a = await finetune([...common, "--out", `${dir}/a`]);
  assert.strictEqual(a.code, 0, a.stderr);

  // run b, killed once it reports step 2 (the state holds step 1, 2 or 3), then rerun
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", SCRIPT, ...common, "--out", `${dir}/b`],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  while (!seen.includes("step 2/4")) {
    const { value, done } = await reader.read();
    if (done) break;
    seen += value;
  }
  child.kill("SIGKILL");
  await child.status;
  reader.releaseLock();
  await child.stderr.cancel().catch(() => {});
  await Deno.stat(`${dir}/b.train-state.safetensors`);
  const b = await finetune([...common, "--out", `${dir}/b`]);
  assert.strictEqual(b.code, 0, b.stderr);
  assert.match(b.stderr, /resuming from .* at step [1-3]\/4/);
  const bytesA = await Deno.readFile(`${dir}/a/model.safetensors`);
  const bytesB = await Deno.readFile(`${dir}/b/model.safetensors`);
  assert.deepStrictEqual(bytesA, bytesB, "resumed checkpoint differs");

  // a state file that is not a training state is refused before anything is written
  await Deno.copyFile(`${dir}/b/model.safetensors`, `${dir}/x.train-state.safetensors`);
  const bad = await finetune([...common, "--out", `${dir}/x`]);
  assert.strictEqual(bad.code, 1);
  assert.match(bad.stderr, /not a moe-condense training state/);
  await assert.rejects(Deno.stat(`${dir}/x`));

  // the output loads like any other checkpoint and keeps the source dtype, has the
  // source's tokenizer, and its temporary folder is gone
  const model = await Model.load(`${dir}/a`, new CpuBackend());
  assert.strictEqual(model.ckpt.files.size > 0, true);
  model.close();
  await Deno.stat(`${dir}/a/tokenizer.json`);
  const left = [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.includes(".tmp-"));
  assert.deepStrictEqual(left, []);
  await Deno.remove(dir, { recursive: true });
});

// Hugging Face's lr_lambda(current_step) for update current_step = 0, 1, ... (LambdaLR
// applies lambda(0) to the first update; the scheduler steps after each optimizer step).
const HF_SCHEDULES = {
  linear: (i: number, total: number, warmup: number) =>
    i < warmup ? i / Math.max(1, warmup) : Math.max(0, (total - i) / Math.max(1, total - warmup)),
  cosine: (i: number, total: number, warmup: number) =>
    i < warmup
      ? i / Math.max(1, warmup)
      : Math.max(0, 0.5 * (1 + Math.cos(Math.PI * (i - warmup) / Math.max(1, total - warmup)))),
  constant: (i: number, _total: number, warmup: number) => i < warmup ? i / Math.max(1, warmup) : 1,
};

Deno.test("train schedules and data order", () => {
  assert.strictEqual(learningRate(1, 4, 1, "linear"), 1);
  assert.strictEqual(learningRate(3, 4, 1, "linear"), 0.5);
  assert(Math.abs(learningRate(3, 4, 1, "cosine") - 0.5) < 1e-12);
  // warmup starts at lr 0, as Hugging Face's Trainer: update 1 of 10 with 4 warmup steps
  // runs at 0, update 2 at lr / 4, update 5 at lr
  assert.strictEqual(learningRate(1, 10, 1, "linear", 4), 0);
  assert.strictEqual(learningRate(2, 10, 1, "linear", 4), 0.25);
  assert.strictEqual(learningRate(5, 10, 1, "linear", 4), 1);
  for (const [schedule, hf] of Object.entries(HF_SCHEDULES)) {
    for (const [total, warmup] of [[10, 4], [7, 0], [5, 1], [3, 3], [1, 0]]) {
      for (let step = 1; step <= total; step++) {
        const got = learningRate(step, total, 2e-5, schedule as Schedule, warmup);
        const want = 2e-5 * hf(step - 1, total, warmup);
        assert(
          Math.abs(got - want) <= 1e-12 * 2e-5,
          `${schedule} step ${step} of ${total}, warmup ${warmup}: ${got} vs HF ${want}`,
        );
      }
    }
  }
  assert.deepStrictEqual(shuffledOrder(10, 3, 0), shuffledOrder(10, 3, 0));
  assert.notDeepStrictEqual(shuffledOrder(10, 3, 0), shuffledOrder(10, 3, 1));
  assert.deepStrictEqual([...shuffledOrder(10, 3, 0)].sort((a, b) => a - b), [...Array(10).keys()]);
});

Deno.test("AdamW decays weights but not biases, norms or ces (Hugging Face Trainer's groups)", async () => {
  assert.deepStrictEqual(
    [
      "model.layers.0.self_attn.q_proj.weight",
      "model.layers.0.self_attn.q_proj.bias",
      "model.layers.0.input_layernorm.weight",
      "model.layers.0.post_attention_layernorm.weight",
      "model.layers.0.self_attn.q_norm.weight",
      "model.norm.weight",
      "model.layers.0.mlp.ces",
      "model.embed_tokens.weight",
      "lm_head.weight",
    ].map(decays),
    [true, false, false, false, false, false, false, true, true],
  );
  // With zero gradients an AdamW step is the decay alone: w * (1 - lr * wd).
  const be = new CpuBackend();
  const model = await Model.load(
    new URL("./fixtures/hf-golden/qwen2_moe-a", import.meta.url).pathname,
    be,
  );
  enableOnModel(model, 1, "test");
  const bias = "model.layers.0.self_attn.q_proj.bias"; // zeros in the fixture
  const values = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i + 1));
  model.putTensor({ name: bias, dtype: "F32", shape: [64], bytes: new Uint8Array(values.buffer) });
  const names = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
    "model.layers.1.mlp.ces",
    "model.layers.1.mlp.experts.2.up_proj.weight",
  ];
  const [lr, weightDecay] = [0.5, 0.1];
  const opt = await Optimizer.create(model, names, {
    lr,
    schedule: "constant",
    warmup: 0,
    ...ADAMW_DEFAULTS,
    weightDecay,
    clip: 1,
  });
  const before = await Promise.all(
    opt.params.map(async (p) => (await be.readWeight(p.weight)).slice()),
  );
  opt.zeroGrad();
  await opt.apply(lr);
  for (const [i, p] of opt.params.entries()) {
    const after = await be.readWeight(p.weight);
    const factor = decays(p.name) ? Math.fround(1 - lr * weightDecay) : 1;
    let worst = 0;
    for (let j = 0; j < after.length; j++) {
      worst = Math.max(worst, Math.abs(after[j] - before[i][j] * factor));
    }
    assert(worst <= 1e-6 * Math.max(...before[i].map(Math.abs)), `${p.name}: off by ${worst}`);
    assert(before[i].some((v) => v !== 0), `${p.name}: all zero, so this checks nothing`);
  }
  model.close();
});

Deno.test("finetune: a non-finite loss stops with the step named, keeps the saved state, writes no model", async () => {
  const dir = await Deno.makeTempDir();
  // lr 1e30 without clipping: after step 1 the trained weights are ~1e30 and the next
  // forward overflows.
  const args = [...SMALL, "--lr", "1e30", "--clip", "0", "--steps", "4", "--save-every", "1"];
  const r = await finetune([...args, "--results", dir, "--out", `${dir}/out`]);
  assert.strictEqual(r.code, 1, r.stderr);
  assert.match(
    r.stderr,
    /^error: step [2-4]: loss .* is not finite; stopped \(the last good state, step [1-3]/m,
  );
  assert.doesNotMatch(r.stderr, /^\s+at /m, "no stack trace");
  await assert.rejects(Deno.stat(`${dir}/out`), "no output checkpoint");
  await Deno.stat(`${dir}/out.train-state.safetensors`); // the last good state is kept
  await Deno.remove(dir, { recursive: true });
});
