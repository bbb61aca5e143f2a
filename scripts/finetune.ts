// Lightweight fine-tuning (CD-MoE step 2): train a chosen set of tensors with AdamW on
// causal-LM loss, everything else frozen; resumable; writes an HF-layout checkpoint the
// toolkit loads like any other and a results JSON with the loss curve. See docs/training.md.

import { createBackend, parseCli, runMain, UsageError } from "../lib/cli.ts";
import { resultsHeader, resultsPath, writeJsonAtomic } from "../lib/io/results.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { DataError } from "../lib/methods/calibration.ts";
import { DEFAULT_MODEL } from "../lib/methods/cli.ts";
import { Model } from "../lib/model/model.ts";
import { enableOnModel } from "../lib/methods/compressed_experts.ts";
import { supportsTraining } from "../lib/backend/backend.ts";
import {
  ADAMW_DEFAULTS,
  evaluate,
  learningRate,
  loadState,
  makeSequences,
  modelFingerprint,
  Optimizer,
  padBatch,
  readTrainingTexts,
  restoreState,
  saveState,
  type Schedule,
  selectTrainable,
  type Sequence,
  shuffledOrder,
  type StateInfo,
  TrainingDivergedError,
  trainStep,
  writeTrainedCheckpoint,
} from "../lib/train/trainer.ts";

const HELP = `Usage: deno run -A scripts/finetune.ts --out DIR [options]

Fine-tunes the --trainable tensors of a model (everything else frozen; the loss is the
ordinary next-token loss at the top) with AdamW, and writes DIR in the HF layout (source
dtype; trained tensors rounded once from their f32 master copy). A training state
(DIR.train-state.safetensors: trained values, AdamW moments, step) is saved every
--save-every steps; rerunning the same command resumes from it.

Options:
  --model DIR        source checkpoint (default data/models/tiny-deepseek-moe)
  --data FILE        JSON lines with "text", or {"instances":[{"text":..}]} (default data/calib_sotu.jsonl)
  --out DIR          output checkpoint folder (required; must not exist unless resuming)
  --trainable SET    condensed (dense MLPs of condensed layers: shared + kept experts,
                     wbar folded into down_proj), experts, all, or comma-separated tensor
                     patterns: globs (model.layers.*.mlp.*) or /regex/ (default condensed);
                     with compressed experts also ces (the scaling vectors only) or
                     ces+main (ces + every expert); all includes ces
  --main-experts K   enable compressed experts (He et al. 2025) with K main experts of
                     the top-k on a checkpoint whose config has none; missing ces start
                     at ones (= plain top-K, unless the model renormalises over the
                     top-k: see --renorm-over). The paper: AdamW, cosine, lr 2e-5 (OLMoE)
  --renorm-over R    with --main-experts, where the architecture renormalises the top-k
                     weights: divide the main experts' by the sum over all top-k (top_k,
                     the compressed-experts release, default) or over the main experts
                     (main: ces = ones is then exactly plain top-K)
  --lr X             peak learning rate (default 1e-5, the reference's)
  --schedule S       linear, cosine or constant (default linear)
  --warmup N         linear warmup steps, from lr 0 as Hugging Face's schedulers (default 0)
  --weight-decay X   AdamW decoupled weight decay, not on biases, norms and ces (default 0)
  --clip X           clip the global gradient norm to X, 0 = off (default 1.0)
  --batch N          sequences per optimizer step (default 8)
  --micro-batch N    sequences per forward/backward; accumulates gradients (default = batch)
  --length N         max tokens per sequence (default 256)
  --epochs N         passes over the data (default 1)
  --steps N          stop after N optimizer steps instead (schedules span N)
  --pack             concatenate documents into full rows instead of padding each one
  --no-mask-padding  train on the pad token at padded positions (the reference does)
  --seed N           data order seed (default 0)
  --recompute        keep only layer inputs; re-run each layer in the backward (less memory)
  --eval FILE        report held-out loss and bits/byte before and after (e.g. data/valid_sotu.jsonl)
  --eval-docs N      documents of --eval to use (default 32)
  --save-every N     save the training state every N steps (default 10)
  --fresh            ignore an existing training state
  --eval-only        only print the --eval loss of --model (no training, no --out)
  --backend B        cpu (default), cpu-reference or webgpu (when it has the backward ops)
  --results DIR      where to record the run (default results; writes results/finetune/)
  -h, --help         this help
`;

function positive(name: string, v: string | undefined, def: number, integer: boolean): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0 || (integer && !Number.isSafeInteger(n))) {
    throw new UsageError(
      `--${name} must be a positive ${integer ? "integer" : "number"}, got "${v}"`,
    );
  }
  return n;
}

function nonNegative(name: string, v: string | undefined, def: number): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new UsageError(`--${name} must be >= 0, got "${v}"`);
  return n;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

await runMain(async () => {
  const v = parseCli(HELP, {
    model: { type: "string" },
    data: { type: "string" },
    out: { type: "string" },
    trainable: { type: "string" },
    lr: { type: "string" },
    schedule: { type: "string" },
    warmup: { type: "string" },
    "weight-decay": { type: "string" },
    clip: { type: "string" },
    batch: { type: "string" },
    "micro-batch": { type: "string" },
    length: { type: "string" },
    epochs: { type: "string" },
    steps: { type: "string" },
    pack: { type: "boolean" },
    "no-mask-padding": { type: "boolean" },
    seed: { type: "string" },
    recompute: { type: "boolean" },
    eval: { type: "string" },
    "eval-docs": { type: "string" },
    "save-every": { type: "string" },
    fresh: { type: "boolean" },
    "eval-only": { type: "boolean" },
    backend: { type: "string" },
    results: { type: "string" },
    "main-experts": { type: "string" },
    "renorm-over": { type: "string" },
  });
  const mainExperts = v["main-experts"] === undefined
    ? undefined
    : positive("main-experts", v["main-experts"], 1, true);
  const renormOver = v["renorm-over"] ?? "top_k";
  if (renormOver !== "top_k" && renormOver !== "main") {
    throw new UsageError(`--renorm-over must be top_k or main, got "${renormOver}"`);
  }
  if (v["renorm-over"] !== undefined && mainExperts === undefined) {
    throw new UsageError("--renorm-over needs --main-experts");
  }
  const withCe = (model: Model) => {
    if (mainExperts !== undefined) {
      enableOnModel(model, mainExperts, "--main-experts", renormOver);
    }
    return model;
  };
  if (v["eval-only"]) {
    if (!v.eval) throw new UsageError("--eval-only needs --eval FILE");
    const dir = v.model ?? DEFAULT_MODEL;
    const model = withCe(await Model.load(dir, await createBackend(v.backend)));
    const tok = await loadTokenizer(dir);
    const texts = (await readTrainingTexts(v.eval)).slice(
      0,
      positive("eval-docs", v["eval-docs"], 32, true),
    );
    const seqs = makeSequences(tok, texts, {
      length: positive("length", v.length, 256, true),
      pack: false,
      maskPadding: true,
      bosTokenId: model.spec.bosTokenId,
    });
    const r = await evaluate(model, tok, seqs, 8);
    console.log(JSON.stringify({ model: dir, eval: v.eval, ...r }));
    return;
  }
  if (!v.out) throw new UsageError("--out is required (see --help)");
  const out = v.out.replace(/\/+$/, "");
  const lr = positive("lr", v.lr, 1e-5, false);
  const batch = positive("batch", v.batch, 8, true);
  const micro = positive("micro-batch", v["micro-batch"], batch, true);
  const length = positive("length", v.length, 256, true);
  const epochs = positive("epochs", v.epochs, 1, true);
  const saveEvery = positive("save-every", v["save-every"], 10, true);
  const evalDocs = positive("eval-docs", v["eval-docs"], 32, true);
  const seed = nonNegative("seed", v.seed, 0);
  const schedule = (v.schedule ?? "linear") as Schedule;
  if (!["linear", "cosine", "constant"].includes(schedule)) {
    throw new UsageError(`--schedule must be linear, cosine or constant, got "${v.schedule}"`);
  }
  const hyper = {
    lr,
    schedule,
    warmup: nonNegative("warmup", v.warmup, 0),
    ...ADAMW_DEFAULTS,
    weightDecay: nonNegative("weight-decay", v["weight-decay"], 0),
    clip: nonNegative("clip", v.clip, 1.0),
  };
  const statePath = `${out}.train-state.safetensors`;
  const resuming = !v.fresh && await exists(statePath);
  if (!resuming && await exists(out)) {
    throw new UsageError(`${out}: output folder already exists (choose another --out)`);
  }

  const backend = await createBackend(v.backend);
  if (!supportsTraining(backend)) {
    throw new UsageError(`backend ${backend.name} has no backward ops yet: use --backend cpu`);
  }
  const modelDir = v.model ?? DEFAULT_MODEL;
  const model = withCe(await Model.load(modelDir, backend));
  const tok = await loadTokenizer(modelDir);
  const trainable = selectTrainable(model, v.trainable ?? "condensed");

  const dataPath = v.data ?? new URL("../data/calib_sotu.jsonl", import.meta.url).pathname;
  const dataOpts = {
    length,
    pack: v.pack ?? false,
    maskPadding: !v["no-mask-padding"],
    bosTokenId: model.spec.bosTokenId,
  };
  const seqs = makeSequences(tok, await readTrainingTexts(dataPath), dataOpts);
  if (seqs.length === 0) {
    throw new DataError(dataPath, "no usable text (every document is shorter than 2 tokens)");
  }
  const padId = tok.padId ?? model.spec.padTokenId ?? tok.eosId ?? 0;
  const stepsPerEpoch = Math.ceil(seqs.length / batch);
  const total = v.steps !== undefined
    ? positive("steps", v.steps, 1, true)
    : epochs * stepsPerEpoch;

  const opt = await Optimizer.create(model, trainable, hyper);
  const fingerprint = modelFingerprint(model);
  let curve: { step: number; loss: number; lr: number; grad_norm: number; tokens: number }[] = [];
  if (resuming) {
    const state = await loadState(statePath);
    if (state.info.model_fingerprint !== fingerprint) {
      throw new UsageError(
        `${statePath}: training state of another model (${state.info.model_fingerprint}), not ${modelDir}`,
      );
    }
    if (state.info.trainable.join() !== trainable.join()) {
      throw new UsageError(`${statePath}: training state of another --trainable set`);
    }
    await restoreState(opt, state.tensors, state.info.step);
    curve = (state.info.extra as { curve: typeof curve }).curve;
    console.error(`resuming from ${statePath} at step ${opt.step}/${total}`);
  }
  console.error(
    `${backend.description}; training ${trainable.length} tensors (${opt.numParams} parameters) of ${modelDir}; ` +
      `${seqs.length} sequences, ${total} steps of ${batch} (micro ${micro})`,
  );

  let evalSeqs: Sequence[] = [];
  let before: Awaited<ReturnType<typeof evaluate>> | null = null;
  if (v.eval) {
    const texts = (await readTrainingTexts(v.eval)).slice(0, evalDocs);
    evalSeqs = makeSequences(tok, texts, { ...dataOpts, pack: false, maskPadding: true });
    before = await evaluate(model, tok, evalSeqs, micro);
    console.error(
      `eval before: loss ${before.loss.toFixed(4)} nats/token, ${
        before.bitsPerByte.toFixed(4)
      } bits/byte`,
    );
  }

  const save = async () =>
    await saveState(
      statePath,
      opt,
      {
        step: opt.step,
        model_fingerprint: fingerprint,
        trainable,
        extra: { curve },
      } satisfies StateInfo,
    );
  const t0 = performance.now();
  let tokensDone = 0;
  const startStep = opt.step;
  while (opt.step < total) {
    const step = opt.step + 1;
    const epoch = Math.floor((step - 1) / stepsPerEpoch);
    const order = shuffledOrder(seqs.length, seed, epoch);
    const first = ((step - 1) % stepsPerEpoch) * batch;
    const chosen = order.slice(first, first + batch).map((i) => seqs[i]);
    const microBatches = [];
    for (let i = 0; i < chosen.length; i += micro) {
      microBatches.push(padBatch(chosen.slice(i, i + micro), padId, dataOpts.maskPadding));
    }
    const rate = learningRate(step, total, lr, schedule, hyper.warmup);
    const r = await trainStep(opt, microBatches, rate, v.recompute ?? false);
    if (!Number.isFinite(r.loss) || !Number.isFinite(r.gradNorm)) {
      throw new TrainingDivergedError(
        `step ${step}: loss ${r.loss}, gradient norm ${r.gradNorm} is not finite; stopped ` +
          `(the last good state, step ${
            opt.step - (Number.isFinite(r.loss) ? 1 : 0)
          }, is ${statePath} if saved)`,
      );
    }
    tokensDone += microBatches.reduce((a, m) => a + m.ids.length, 0);
    curve.push({ step, loss: r.loss, lr: rate, grad_norm: r.gradNorm, tokens: r.tokens });
    const sec = (performance.now() - t0) / 1000;
    const perStep = sec / (opt.step - startStep);
    console.error(
      `step ${step}/${total} loss ${r.loss.toFixed(4)} lr ${rate.toExponential(2)} |g| ${
        r.gradNorm.toFixed(3)
      } ` +
        `${(tokensDone / sec).toFixed(0)} tok/s eta ${(perStep * (total - opt.step)).toFixed(0)}s`,
    );
    if (opt.step % saveEvery === 0 || opt.step === total) await save();
  }
  const trainSeconds = (performance.now() - t0) / 1000;

  let after: Awaited<ReturnType<typeof evaluate>> | null = null;
  if (v.eval) {
    after = await evaluate(model, tok, evalSeqs, micro);
    console.error(
      `eval after: loss ${after.loss.toFixed(4)} nats/token, ${
        after.bitsPerByte.toFixed(4)
      } bits/byte`,
    );
  }
  const provenance = {
    finetune: {
      source: modelDir,
      data: dataPath,
      trainable: v.trainable ?? "condensed",
      main_experts: mainExperts ?? null,
      steps: total,
      lr,
      schedule,
    },
  };
  await writeTrainedCheckpoint(opt, out, provenance);
  const name = out.split("/").pop()!;
  const record = resultsPath(v.results ?? "results", "finetune", name);
  await writeJsonAtomic(record, {
    ...await resultsHeader("finetune", 1),
    model: modelDir,
    out,
    data: dataPath,
    trainable: v.trainable ?? "condensed",
    trainable_tensors: trainable,
    trainable_params: opt.numParams,
    options: {
      ...hyper,
      batch,
      micro_batch: micro,
      length,
      epochs,
      steps: total,
      seed,
      pack: dataOpts.pack,
      mask_padding: dataOpts.maskPadding,
    },
    backend: backend.description,
    train_seconds: trainSeconds,
    tokens_per_second: tokensDone / trainSeconds,
    eval: v.eval ? { file: v.eval, docs: evalSeqs.length, before, after } : null,
    curve,
  });
  await Deno.remove(statePath).catch(() => {});
  console.log(`wrote ${out} and ${record}`);
  model.close();
});
