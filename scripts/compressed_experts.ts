// The Compressed Experts comparison (He et al. 2025) on one model: full top-k, top-k_m,
// top-k_m + CE (ces trained with scripts/finetune.ts) and top-1, side by side: held-out
// bits/byte, the shipped tasks (scripts/eval_lm_harness.ts), active parameters, prefill
// and decode speed (lib/eval/measure.ts), and "% of full top-k" as in the paper. Writes
// versioned JSON under results/compressed_experts/. See docs/compressed-experts.md.

import { createBackend, parseCli, positiveInt, runMain, UsageError } from "../lib/cli.ts";
import { measureModel, prefillRounds } from "../lib/eval/measure.ts";
import { readJson } from "../lib/io/checkpoint.ts";
import { resultsHeader, writeJsonAtomic } from "../lib/io/results.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { DEFAULT_MODEL } from "../lib/methods/cli.ts";
import type { MlpSpec } from "../lib/model/config.ts";
import { Model } from "../lib/model/model.ts";
import { evaluate, makeSequences, readTrainingTexts } from "../lib/train/trainer.ts";

const HELP = `usage: deno run -A scripts/compressed_experts.ts [options]

Compares top-k, top-k_m, top-k_m + compressed experts (trained) and top-1 on one model.

  --model DIR         source checkpoint (default data/models/tiny-deepseek-moe)
  --main-experts K    k_m (default k/2)
  --train-data FILE   data to train the ces on (default data/calib_sotu.jsonl)
  --trainable SET     ces or ces+main (default ces)
  --lr X              peak learning rate, cosine schedule, AdamW (default 1e-1; the
                      paper's 2e-5 is for full SFT of OLMoE, far too small for ces alone)
  --epochs N          training passes (default 2, the paper's)
  --eval FILE         held-out text for bits/byte (default data/valid_sotu.jsonl)
  --eval-docs N       documents of --eval (default 64)
  --no-tasks          skip the shipped tasks (deno task eval)
  --backend cpu|webgpu (default cpu) for evaluation and speed
  --batch N --prompt N --decode N --repeats N   speed settings (default 4, 128, 32, 3)
  --work DIR          variant checkpoints (default results/tmp/compressed_experts)
  --output PATH       results JSON (default results/compressed_experts/<date>-<model>.json)
  -h, --help`;

const ROOT = new URL("../", import.meta.url).pathname;
const LINKED = ["tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"];

/** A variant folder: the source's config with `changes`, its tensors and tokenizer linked. */
async function variant(src: string, dir: string, changes: Record<string, unknown>) {
  await Deno.remove(dir, { recursive: true }).catch(() => {});
  await Deno.mkdir(dir, { recursive: true });
  const config = { ...(await readJson(`${src}/config.json`)), ...changes };
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config, null, 2) + "\n");
  // The weights: model.safetensors, or the shards an index names.
  const shards = [...Deno.readDirSync(src)].map((e) => e.name).filter((n) =>
    n.endsWith(".safetensors")
  );
  for (const f of [...LINKED, ...shards]) {
    const path = await Deno.realPath(`${src}/${f}`).catch(() => null);
    if (path) await Deno.symlink(path, `${dir}/${f}`);
  }
}

async function run(script: string, args: string[]): Promise<void> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--unstable-webgpu", `${ROOT}scripts/${script}`, ...args],
    stdout: "inherit",
    stderr: "inherit",
  }).output();
  if (!out.success) throw new Error(`${script} ${args.join(" ")} failed (exit ${out.code})`);
}

await runMain(async () => {
  const v = parseCli(HELP, {
    model: { type: "string" },
    "main-experts": { type: "string" },
    "train-data": { type: "string" },
    trainable: { type: "string" },
    lr: { type: "string" },
    epochs: { type: "string" },
    eval: { type: "string" },
    "eval-docs": { type: "string" },
    "no-tasks": { type: "boolean" },
    backend: { type: "string" },
    batch: { type: "string" },
    prompt: { type: "string" },
    decode: { type: "string" },
    repeats: { type: "string" },
    work: { type: "string" },
    output: { type: "string" },
  });
  const src = (v.model ?? DEFAULT_MODEL).replace(/\/+$/, "");
  const backendName = v.backend ?? "cpu";
  const probe = await Model.load(src, await createBackend("cpu"));
  const moe = probe.spec.layers.find((l) => l.mlp.kind === "moe")?.mlp as
    | Extract<MlpSpec, { kind: "moe" }>
    | undefined;
  probe.close();
  if (!moe) throw new UsageError(`${src}: no MoE layers, nothing to compress`);
  const k = moe.topK;
  const km = positiveInt("main-experts", v["main-experts"], Math.max(1, k >> 1));
  if (km >= k) throw new UsageError(`--main-experts must be in [1, ${k - 1}], got ${km}`);
  const trainable = v.trainable ?? "ces";
  if (!["ces", "ces+main"].includes(trainable)) {
    throw new UsageError(`--trainable must be ces or ces+main, got "${trainable}"`);
  }
  const lr = Number(v.lr ?? "1e-1");
  if (!(lr > 0)) throw new UsageError(`--lr must be a positive number, got "${v.lr}"`);
  const epochs = positiveInt("epochs", v.epochs, 2);
  const evalFile = v.eval ?? `${ROOT}data/valid_sotu.jsonl`;
  const evalDocs = positiveInt("eval-docs", v["eval-docs"], 64);
  const trainData = v["train-data"] ?? `${ROOT}data/calib_sotu.jsonl`;
  const work = (v.work ?? `${ROOT}results/tmp/compressed_experts`).replace(/\/+$/, "");
  const speed = {
    batch: positiveInt("batch", v.batch, 4),
    prompt: positiveInt("prompt", v.prompt, 128),
    decode: positiveInt("decode", v.decode, 32),
    repeats: positiveInt("repeats", v.repeats, 3),
  };

  // The variants: plain top-k' by config, and CE trained from top-k_m + ces = ones.
  const variants: { name: string; dir: string; topK: number; ce: boolean }[] = [];
  const add = async (name: string, topK: number) => {
    const dir = `${work}/${name}`;
    await variant(src, dir, { num_experts_per_tok: topK });
    variants.push({ name, dir, topK, ce: false });
  };
  await add(`top-${k}`, k);
  await add(`top-${km}`, km);
  const ceDir = `${work}/top-${km}-ce`;
  await Deno.remove(ceDir, { recursive: true }).catch(() => {});
  await Deno.remove(`${ceDir}.train-state.safetensors`).catch(() => {});
  console.error(`training ces (${trainable}, k_m=${km}) on ${trainData} ...`);
  const t0 = performance.now();
  await run("finetune.ts", [
    "--model",
    src,
    "--main-experts",
    String(km),
    "--trainable",
    trainable,
    "--data",
    trainData,
    "--lr",
    String(lr),
    "--schedule",
    "cosine",
    "--epochs",
    String(epochs),
    "--out",
    ceDir,
    "--results",
    `${work}/finetune-results`,
  ]);
  const trainSeconds = (performance.now() - t0) / 1000;
  variants.push({ name: `top-${km}+ce`, dir: ceDir, topK: k, ce: true });
  if (km > 1) await add("top-1", 1);

  const rows = [];
  for (const vt of variants) {
    console.error(`evaluating ${vt.name} ...`);
    const backend = await createBackend(backendName);
    const model = await Model.load(vt.dir, backend);
    const tok = await loadTokenizer(vt.dir);
    const texts = (await readTrainingTexts(evalFile)).slice(0, evalDocs);
    const seqs = makeSequences(tok, texts, {
      length: 256,
      pack: false,
      maskPadding: true,
      bosTokenId: model.spec.bosTokenId,
    });
    const heldOut = await evaluate(model, tok, seqs, 8);
    model.close();
    let tasks: Record<string, Record<string, unknown>> | null = null;
    if (!v["no-tasks"]) {
      const out = `${work}/eval-${vt.name}.json`;
      await run("eval_lm_harness.ts", [
        "--model",
        vt.dir,
        "--backend",
        backendName,
        "--output",
        out,
      ]);
      tasks = ((await readJson(out)) as { results: typeof tasks }).results;
    }
    const measured = await measureModel(vt.dir, await createBackend(backendName), speed);
    rows.push({
      name: vt.name,
      top_k: vt.topK,
      main_experts: vt.ce ? km : vt.topK,
      compressed_experts: vt.ce,
      held_out: { file: evalFile, docs: seqs.length, ...heldOut },
      tasks,
      params: measured.params,
      prefill_tokens_per_s: measured.prefill_tokens_per_s,
      prefill_tokens_per_s_interleaved: 0,
      decode_tokens_per_s: measured.decode_tokens_per_s,
      device: measured.device,
    });
  }

  // Prefill again in interleaved rounds (every variant once per round): timing variant
  // after variant lets JIT warm-up and machine load drift into the ratios.
  const interleaved = await prefillRounds(
    variants.map((vt) => vt.dir),
    await createBackend(backendName),
    { batch: speed.batch, prompt: speed.prompt, rounds: 2 * speed.repeats + 1 },
  );
  rows.forEach((r, i) => (r.prefill_tokens_per_s_interleaved = interleaved[i]));

  // "% of full top-k": task metrics as score / full score; bits/byte as the share of the
  // top-k_m -> top-k gap that the variant closes (full = 100, top-k_m = 0).
  const full = rows[0], reduced = rows[1];
  // acc (higher is better) or bits_per_byte (lower is better, so full / variant)
  const metric = (r: typeof full, task: string): [number, boolean] | null => {
    const t = r.tasks?.[task];
    if (!t) return null;
    for (const key of ["acc,none", "acc_norm,none"]) {
      if (typeof t[key] === "number") return [t[key] as number, true];
    }
    return typeof t["bits_per_byte,none"] === "number"
      ? [t["bits_per_byte,none"] as number, false]
      : null;
  };
  const summary = rows.map((r) => {
    const pct: Record<string, number | null> = {};
    for (const task of Object.keys(full.tasks ?? {})) {
      const a = metric(r, task), b = metric(full, task);
      if (a === null || b === null || a[0] === 0 || b[0] === 0) pct[task] = null;
      else pct[task] = a[1] ? (100 * a[0]) / b[0] : (100 * b[0]) / a[0];
    }
    const gap = reduced.held_out.bitsPerByte - full.held_out.bitsPerByte;
    return {
      name: r.name,
      bits_per_byte: r.held_out.bitsPerByte,
      bpb_gap_closed_pct: gap !== 0
        ? (100 * (reduced.held_out.bitsPerByte - r.held_out.bitsPerByte)) / gap
        : null,
      bpb_pct_of_full: (100 * full.held_out.bitsPerByte) / r.held_out.bitsPerByte,
      task_pct_of_full: pct,
      active_params: r.params.active,
      active_params_pct: (100 * r.params.active) / full.params.active,
      prefill_tokens_per_s: r.prefill_tokens_per_s,
      prefill_tokens_per_s_interleaved: r.prefill_tokens_per_s_interleaved,
      decode_tokens_per_s: r.decode_tokens_per_s,
    };
  });
  console.table(summary.map((s) => ({ ...s, task_pct_of_full: undefined })));

  const name = src.split("/").pop()!;
  const date = new Date().toISOString().slice(0, 10);
  const output = v.output ?? `${ROOT}results/compressed_experts/${date}-${name}.json`;
  await writeJsonAtomic(output, {
    ...await resultsHeader("compressed_experts", 1),
    model: src,
    top_k: k,
    main_experts: km,
    training: {
      data: trainData,
      trainable,
      optimizer: "AdamW",
      schedule: "cosine",
      lr,
      epochs,
      seconds: trainSeconds,
    },
    speed_settings: { backend: backendName, ...speed },
    summary,
    variants: rows,
  });
  console.log(`wrote ${output}`);
});
