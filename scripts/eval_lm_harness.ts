// Zero/few-shot evaluation scored exactly like EleutherAI's lm-evaluation-harness v0.4.9.1
// (HFLM, causal): multiple-choice acc / acc_norm with stderr, rolling perplexity, results
// JSON with the harness's keys. See docs/evaluation.md.

import { parseArgs } from "node:util";
import { createBackend, UsageError } from "../lib/cli.ts";
import { TaskDataError } from "../lib/eval/data.ts";
import {
  buildResults,
  formatTable,
  HARNESS_VERSION,
  harnessJson,
  harnessTokenizerInfo,
  loadTask,
  REPO_ROOT,
  resolveTasks,
  scoreTasks,
} from "../lib/eval/evaluator.ts";
import { ModelLM } from "../lib/eval/lm.ts";
import { GROUPS, SHIPPED_PERPLEXITY_TASKS, SHIPPED_TASKS, TASKS } from "../lib/eval/tasks.ts";
import { writeTextAtomic } from "../lib/io/results.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { Model } from "../lib/model/model.ts";

const DEFAULT_MODEL = `${REPO_ROOT}/data/models/tiny-deepseek-moe`;
const DEFAULT_TASKS = [...SHIPPED_TASKS, "sotu_ppl"];

const HELP = `usage: deno run -A --unstable-webgpu scripts/eval_lm_harness.ts [options]

Scores tasks like lm-evaluation-harness v${HARNESS_VERSION} (loglikelihood / loglikelihood_rolling).

  --tasks a,b          tasks or groups (default: ${DEFAULT_TASKS.join(",")})
  --data-dir DIR       where downloaded HF datasets live (default: data/hf); see docs/evaluation.md
  --model DIR          HF checkpoint folder (default: data/models/tiny-deepseek-moe)
  --backend cpu|webgpu (default: cpu)
  --batch-size N       sequences per forward (default: 8)
  --max-length N       model input length (default: config max_position_embeddings, as HFLM)
  --add-bos            encode with BOS like HFLM add_bos_token=True (default: off, as HFLM
                       v${HARNESS_VERSION}; from v0.4.9.2 the harness follows the tokenizer)
  --limit N            first N docs per task (a fraction < 1 takes that share, like the harness)
  --num-fewshot N      few-shot examples from the task's train/dev split (default: 0)
  --log-samples        also write per-doc samples_<task>_<date>.jsonl next to the results
  --output PATH        results .json file, or folder (default: results/eval/<model name>/)
  --list-tasks         print the known tasks and groups
  -h, --help

Tasks: arc_easy arc_challenge boolq hellaswag piqa winogrande openbookqa rte mmlu
(groups mmlu_stem, mmlu_other, mmlu_social_sciences, mmlu_humanities, or mmlu_<subject>),
shipped: ${[...SHIPPED_TASKS, ...SHIPPED_PERPLEXITY_TASKS].join(" ")}`;

async function gitHash(): Promise<string | null> {
  try {
    const out = await new Deno.Command("git", {
      args: ["rev-parse", "--short", "HEAD"],
      cwd: REPO_ROOT,
    })
      .output();
    return out.success ? new TextDecoder().decode(out.stdout).trim() : null;
  } catch {
    return null;
  }
}

function positiveInt(name: string, v: string | undefined, dflt: number | null): number | null {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) {
    throw new TaskDataError(`--${name} must be a non-negative integer, not "${v}"`);
  }
  return n;
}

async function main(): Promise<void> {
  const { values: args } = parseArgs({
    options: {
      tasks: { type: "string" },
      "data-dir": { type: "string", default: "data/hf" },
      model: { type: "string", default: DEFAULT_MODEL },
      backend: { type: "string", default: "cpu" },
      "batch-size": { type: "string" },
      "max-length": { type: "string" },
      "add-bos": { type: "boolean", default: false },
      limit: { type: "string" },
      "num-fewshot": { type: "string" },
      "log-samples": { type: "boolean", default: false },
      output: { type: "string" },
      "list-tasks": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (args.help) return console.log(HELP);
  if (args["list-tasks"]) {
    console.log([...TASKS.keys()].join("\n"));
    console.log(`groups: ${[...GROUPS.keys()].join(", ")}`);
    return;
  }
  const requested = (args.tasks ?? DEFAULT_TASKS.join(",")).split(",").map((s) => s.trim()).filter(
    Boolean,
  );
  const batchSize = positiveInt("batch-size", args["batch-size"], 8)!;
  if (batchSize < 1) throw new TaskDataError("--batch-size must be at least 1");
  const numFewshot = positiveInt("num-fewshot", args["num-fewshot"], 0)!;
  let limit: number | null = null;
  if (args.limit !== undefined) {
    limit = Number(args.limit);
    if (!(limit > 0)) {
      throw new TaskDataError(`--limit must be a positive number, not "${args.limit}"`);
    }
  }

  // Everything that can be wrong with the input is checked before any scoring.
  const leafNames = resolveTasks(requested);
  const tasks = [];
  for (const name of leafNames) {
    tasks.push(await loadTask(name, args["data-dir"]!, limit, numFewshot));
  }

  const start = Date.now(), startClock = performance.now() / 1000;
  const backend = await createBackend(args.backend!);
  const model = await Model.load(args.model!, backend);
  const tokenizer = await loadTokenizer(args.model!);
  const maxLength = positiveInt("max-length", args["max-length"], model.spec.maxPositions)!;
  let lastReport = 0;
  const lm = new ModelLM(model, tokenizer, {
    maxLength,
    batchSize,
    addBos: args["add-bos"],
    onProgress: (done, total) => {
      if (Date.now() - lastReport > 10_000 || done === total) {
        lastReport = Date.now();
        console.error(`  ${done}/${total} tokens (${((Date.now() - start) / 1000).toFixed(0)} s)`);
      }
    },
  });
  const scored = await scoreTasks(lm, tasks, numFewshot);
  const endClock = performance.now() / 1000, seconds = endClock - startClock;

  const modelArgs = `pretrained=${args.model},backend=${args.backend},max_length=${maxLength},` +
    `add_bos_token=${args["add-bos"]}`;
  const results = buildResults(
    {
      model: "moe-condense",
      modelArgs,
      batchSize,
      device: backend.description,
      limit,
      numFewshot,
      requested,
    },
    tasks,
    scored,
    {
      gitHash: await gitHash(),
      date: start / 1000,
      startTime: startClock,
      endTime: endClock,
      tokenizer: harnessTokenizerInfo(tokenizer, maxLength),
    },
  );
  const truncated = Object.values(results.truncated_requests as Record<string, number>).reduce(
    (a, b) => a + b,
    0,
  );
  if (truncated > 0) {
    console.error(
      `warning: ${truncated} requests were longer than ${maxLength} tokens and left-truncated`,
    );
  }

  const stamp = new Date(start).toISOString().replaceAll(":", "-").replace(/\.\d+Z$/, "");
  const modelName = args.model!.replace(/\/$/, "").split("/").pop()!;
  const out = args.output ?? `results/eval/${modelName}`;
  const file = out.endsWith(".json") ? out : `${out}/results_${stamp}.json`;
  if (args["log-samples"]) {
    const dir = file.slice(0, file.lastIndexOf("/") + 1);
    for (const [name, r] of scored) {
      const text = r.samples.map((s) => JSON.stringify(s)).join("\n") + "\n";
      await writeTextAtomic(`${dir}samples_${name}_${stamp}.jsonl`, text);
    }
  }
  await writeTextAtomic(file, harnessJson(results));

  console.log(
    `moe-condense (${modelArgs}), limit: ${limit}, num_fewshot: ${numFewshot}, batch_size: ${batchSize}`,
  );
  console.log(formatTable(results));
  if (results.groups !== undefined) {
    console.log("\n" + formatTable(results, "groups"));
  }
  const st = lm.stats;
  console.log(
    `\n${seconds.toFixed(1)} s, ${st.tokens} tokens in ${st.batches} forwards ` +
      `(${(st.tokens / seconds).toFixed(0)} tokens/s, padding ${
        (100 * (1 - st.tokens / Math.max(1, st.paddedTokens))).toFixed(1)
      }%)`,
  );
  console.log(`results: ${file}`);
  model.close();
}

try {
  await main();
} catch (e) {
  console.error(`error: ${(e as Error).message}`);
  // Bad input gets one line; anything else is a bug worth a stack trace.
  const argError = (e as { code?: string }).code?.startsWith("ERR_PARSE_ARGS");
  if (!(e instanceof TaskDataError) && !(e instanceof UsageError) && !argError) {
    console.error((e as Error).stack);
  }
  Deno.exit(1);
}
