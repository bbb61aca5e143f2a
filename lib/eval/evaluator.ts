// Build requests for tasks, score them with a LanguageModel, aggregate like
// lm-evaluation-harness, and assemble its results JSON and printed table.

import { findSplitFiles, readSplit, type SourcedDoc, TaskDataError } from "./data.ts";
import type { LanguageModel, LoglikelihoodRequest } from "./lm.ts";
import {
  countBytes,
  countWords,
  mean,
  meanStderr,
  multipleChoiceScores,
  perplexityMetrics,
  pooledSampleStderr,
  weightedMean,
} from "./metrics.ts";
import { PyRandom } from "./pyrandom.ts";
import { type FieldType, GROUPS, type TaskDef, TASKS } from "./tasks.ts";

export const FEWSHOT_SEED = 1234;
export const REPO_ROOT = new URL("../../", import.meta.url).pathname.replace(/\/$/, "");

export interface LoadedTask {
  def: TaskDef;
  docs: SourcedDoc[];
  fewshotDocs: SourcedDoc[];
  originalSize: number;
}

/** Expand task and group names into leaf tasks (in order, no duplicates). */
export function resolveTasks(names: string[]): string[] {
  const out: string[] = [];
  const visit = (name: string) => {
    if (GROUPS.has(name)) return GROUPS.get(name)!.forEach(visit);
    if (!TASKS.has(name)) {
      throw new TaskDataError(
        `unknown task "${name}" (see --help for the list; groups: ${
          [...GROUPS.keys()].join(", ")
        })`,
      );
    }
    if (!out.includes(name)) out.push(name);
  };
  names.forEach(visit);
  return out;
}

/** Folders searched for a task's split files, in order. */
export function candidateDirs(def: TaskDef, dataDir: string): string[] {
  const dirs = [`${dataDir}/${def.name}`];
  const base = def.datasetPath.split("/").pop()!;
  for (const p of [def.datasetPath, base]) {
    if (def.datasetName) dirs.push(`${dataDir}/${p}/${def.datasetName}`);
    else dirs.push(`${dataDir}/${p}`);
  }
  if (def.shipped) dirs.push(`${REPO_ROOT}/data/tasks/${def.name}`);
  return [...new Set(dirs)];
}

function checkFields(def: TaskDef, d: SourcedDoc): void {
  const where = `${d.file}:${d.line}`;
  for (const [path, type] of Object.entries(def.fields)) {
    let v: unknown = d.doc;
    for (const part of path.split(".")) {
      v = v !== null && typeof v === "object" ? (v as Record<string, unknown>)[part] : undefined;
    }
    if (v === undefined || v === null) {
      throw new TaskDataError(`${where}: missing field "${path}" required by task ${def.name}`);
    }
    if (!fieldOk(v, type)) {
      throw new TaskDataError(`${where}: field "${path}" of task ${def.name} should be ${type}`);
    }
  }
}

function fieldOk(v: unknown, type: FieldType): boolean {
  if (type === "string") return typeof v === "string";
  if (type === "number") return typeof v === "number";
  if (type === "string[]") return Array.isArray(v) && v.every((x) => typeof x === "string");
  return (typeof v === "number" && Number.isInteger(v)) ||
    (typeof v === "string" && /^\s*-?\d+\s*$/.test(v));
}

async function loadSplit(def: TaskDef, split: string, dataDir: string): Promise<SourcedDoc[]> {
  const { files, searched } = await findSplitFiles(candidateDirs(def, dataDir), split);
  if (files.length === 0) {
    throw new TaskDataError(
      `task ${def.name}: no "${split}" split found (looked for ${split}.jsonl, ${split}.json, ` +
        `${split}.parquet, ${split}-*.parquet in: ${searched.join(", ")})`,
    );
  }
  const docs = await readSplit(files);
  for (const d of docs) checkFields(def, d);
  return docs;
}

/** The harness's --limit: a fraction below 1, else a count. */
export function effectiveLimit(n: number, limit: number | null): number {
  if (limit === null) return n;
  return Math.min(n, limit < 1 ? Math.ceil(n * limit) : Math.floor(limit));
}

export async function loadTask(
  name: string,
  dataDir: string,
  limit: number | null,
  numFewshot: number,
): Promise<LoadedTask> {
  const def = TASKS.get(name)!;
  const all = await loadSplit(def, def.testSplit, dataDir);
  const docs = all.slice(0, effectiveLimit(all.length, limit));
  let fewshotDocs: SourcedDoc[] = [];
  if (numFewshot > 0) {
    if (def.fewshotSplit === null) throw new TaskDataError(`task ${name} has no few-shot split`);
    fewshotDocs = await loadSplit(def, def.fewshotSplit, dataDir);
    if (fewshotDocs.length < numFewshot) {
      throw new TaskDataError(
        `task ${name}: --num-fewshot ${numFewshot} but the ${def.fewshotSplit} split has ${fewshotDocs.length} docs`,
      );
    }
  }
  // Choices and gold are checked for every doc now, so bad data fails before any scoring.
  if (def.outputType === "multiple_choice") {
    for (const d of [...docs, ...fewshotDocs]) choicesAndGold(def, d);
  }
  return { def, docs, fewshotDocs, originalSize: all.length };
}

interface Instance {
  task: string;
  docId: number;
  doc: SourcedDoc;
  /** One loglikelihood request per choice (multiple choice). */
  requests: LoglikelihoodRequest[];
  choices: string[];
  gold: number;
}

/** Check and compute choices and gold for a doc; bad data names file, line and problem. */
function choicesAndGold(def: TaskDef, d: SourcedDoc): { choices: string[]; gold: number } {
  const where = `${d.file}:${d.line}`;
  const choices = def.docToChoice(d.doc);
  if (!Array.isArray(choices) || choices.length === 0) {
    throw new TaskDataError(`${where}: task ${def.name}: empty choice list`);
  }
  const gold = def.docToTarget(d.doc);
  if (!Number.isInteger(gold) || gold < 0 || gold >= choices.length) {
    throw new TaskDataError(
      `${where}: task ${def.name}: gold index ${gold} out of range for ${choices.length} choices`,
    );
  }
  return { choices, gold };
}

/** The few-shot prefix: examples joined by "\n\n", ending with "\n\n" (empty for 0-shot). */
function fewshotPrefix(task: LoadedTask, doc: SourcedDoc, n: number, rnd: PyRandom): string {
  if (n === 0) return "";
  const def = task.def;
  let selected: SourcedDoc[];
  if (def.sampler === "first_n") selected = task.fewshotDocs.slice(0, n);
  else {
    // The harness samples n + 1 when few-shot and test splits coincide, then drops the doc.
    const sameSplit = def.fewshotSplit === def.testSplit;
    const picked = rnd.sample(task.fewshotDocs, sameSplit ? n + 1 : n);
    const key = JSON.stringify(doc.doc);
    selected = picked.filter((x) => JSON.stringify(x.doc) !== key).slice(0, n);
  }
  return selected.map((x) => {
    const { choices, gold } = choicesAndGold(def, x);
    const target = def.multipleInputContinuation
      ? def.multipleInputContinuation(x.doc)
      : choices[gold];
    return def.docToText(x.doc) + " " + target;
  }).join("\n\n") + "\n\n";
}

export function buildInstances(task: LoadedTask, numFewshot: number): Instance[] {
  const def = task.def;
  // One RNG per task, advanced doc by doc in order, like the harness's sampler.
  const rnd = new PyRandom(FEWSHOT_SEED);
  return task.docs.map((d, docId) => {
    if (def.outputType === "loglikelihood_rolling") {
      return { task: def.name, docId, doc: d, requests: [], choices: [], gold: 0 };
    }
    const { choices, gold } = choicesAndGold(def, d);
    const prefix = def.description + fewshotPrefix(task, d, numFewshot, rnd);
    const requests = def.multipleInputContinuation
      ? choices.map((ctx) => ({
        context: prefix + ctx,
        continuation: " " + def.multipleInputContinuation!(d.doc),
      }))
      : choices.map((c) => ({ context: prefix + def.docToText(d.doc), continuation: " " + c }));
    return { task: def.name, docId, doc: d, requests, choices, gold };
  });
}

export interface TaskResult {
  metrics: Record<string, number>;
  stderrs: Record<string, number | "N/A">;
  samples: Record<string, unknown>[];
  truncated: number;
  size: number;
}

/** Score all tasks: one batched loglikelihood call and one rolling call across tasks. */
export async function scoreTasks(
  lm: LanguageModel,
  tasks: LoadedTask[],
  numFewshot: number,
): Promise<Map<string, TaskResult>> {
  const instances = tasks.map((t) => buildInstances(t, numFewshot));
  const flat = instances.flat();
  const llRequests = flat.flatMap((i) => i.requests);
  const llResults = await lm.loglikelihood(llRequests);
  const rollingTexts = tasks.flatMap((t, k) =>
    t.def.outputType === "loglikelihood_rolling"
      ? instances[k].map((i) => t.def.docToText(i.doc.doc))
      : []
  );
  const rollingResults = await lm.loglikelihoodRolling(rollingTexts);

  const out = new Map<string, TaskResult>();
  let llAt = 0, rollAt = 0;
  tasks.forEach((task, k) => {
    const def = task.def, samples: Record<string, unknown>[] = [];
    let truncated = 0;
    if (def.outputType === "loglikelihood_rolling") {
      const lls: number[] = [], words: number[] = [], bytes: number[] = [];
      for (const inst of instances[k]) {
        const text = def.docToText(inst.doc.doc), ll = rollingResults[rollAt++];
        lls.push(ll), words.push(countWords(text)), bytes.push(countBytes(text));
        samples.push({
          doc_id: inst.docId,
          doc: inst.doc.doc,
          target: text,
          arguments: [[text]],
          resps: [[ll]],
          word_perplexity: [ll, countWords(text)],
          byte_perplexity: [ll, countBytes(text)],
          bits_per_byte: [ll, countBytes(text)],
        });
      }
      // The harness reports no stderr for these corpus-level metrics.
      const metrics = perplexityMetrics(lls, words, bytes);
      const stderrs = Object.fromEntries(Object.keys(metrics).map((m) => [m, "N/A" as const]));
      out.set(def.name, { metrics, stderrs, samples, truncated, size: instances[k].length });
      return;
    }
    const per: Record<string, number[]> = Object.fromEntries(def.metrics.map((m) => [m, []]));
    for (const inst of instances[k]) {
      const res = llResults.slice(llAt, llAt + inst.requests.length);
      llAt += inst.requests.length;
      truncated += res.filter((r) => r.truncated).length;
      const lls = res.map((r) => r.logprob);
      // Multiple-input tasks normalise by the (shared) continuation, like the harness.
      const normTexts = def.multipleInputContinuation
        ? inst.requests.map((r) => r.continuation.slice(1))
        : inst.choices;
      const scores = multipleChoiceScores(lls, normTexts, inst.gold);
      for (const m of def.metrics) per[m].push(scores[m as "acc" | "acc_norm"]);
      samples.push({
        doc_id: inst.docId,
        doc: inst.doc.doc,
        target: inst.gold,
        arguments: inst.requests.map((r) => [r.context, r.continuation]),
        resps: res.map((r) => [[r.logprob, r.isGreedy]]),
        filtered_resps: res.map((r) => [r.logprob, r.isGreedy]),
        ...Object.fromEntries(def.metrics.map((m) => [m, scores[m as "acc" | "acc_norm"]])),
      });
    }
    const metrics = Object.fromEntries(def.metrics.map((m) => [m, mean(per[m])]));
    const stderrs = Object.fromEntries(def.metrics.map((m) => [m, meanStderr(per[m])]));
    out.set(def.name, { metrics, stderrs, samples, truncated, size: instances[k].length });
  });
  return out;
}

export interface RunConfig {
  model: string;
  modelArgs: string;
  batchSize: number;
  device: string;
  limit: number | null;
  numFewshot: number;
  requested: string[];
}

/** Groups touched by the requested names, innermost first (so parents see child results). */
function groupsFor(requested: string[]): string[] {
  const order: string[] = [];
  const visit = (name: string) => {
    if (!GROUPS.has(name)) return;
    for (const child of GROUPS.get(name)!) visit(child);
    if (!order.includes(name)) order.push(name);
  };
  requested.forEach(visit);
  return order;
}

const fmtKey = (metric: string) => `${metric},none`;
const fmtStderrKey = (metric: string) => `${metric}_stderr,none`;

/** The harness's results dictionary. */
export function buildResults(
  cfg: RunConfig,
  tasks: LoadedTask[],
  scored: Map<string, TaskResult>,
  extra: { gitHash: string | null; startTime: number; seconds: number },
): Record<string, unknown> {
  const results: Record<string, Record<string, unknown>> = {};
  const groups: Record<string, Record<string, unknown>> = {};
  const groupSubtasks: Record<string, string[]> = {};
  const configs: Record<string, unknown> = {};
  const versions: Record<string, number> = {};
  const nShot: Record<string, number> = {};
  const higherIsBetter: Record<string, Record<string, boolean>> = {};
  const nSamples: Record<string, unknown> = {};
  const truncatedRequests: Record<string, number> = {};

  // Depth for aliases: subtasks of a group are indented like the harness prints them.
  const depth = new Map<string, number>();
  const setDepth = (name: string, d: number) => {
    depth.set(name, Math.max(depth.get(name) ?? 0, d));
    for (const c of GROUPS.get(name) ?? []) setDepth(c, d + 1);
  };
  cfg.requested.forEach((n) => setDepth(n, 0));
  const alias = (name: string) => {
    const d = depth.get(name) ?? 0;
    // Under a group the harness shows "stem" for mmlu_stem, "abstract_algebra" for mmlu_abstract_algebra.
    const short = name.startsWith("mmlu_") ? name.slice(5) : name;
    return d === 0 ? name : `${" ".repeat(d - 1)} - ${short}`;
  };

  const sizes = new Map<string, number>();
  for (const t of tasks) {
    const name = t.def.name, r = scored.get(name)!;
    const entry: Record<string, unknown> = { alias: alias(name) };
    for (const m of t.def.metrics) {
      entry[fmtKey(m)] = r.metrics[m];
      entry[fmtStderrKey(m)] = r.stderrs[m];
    }
    results[name] = entry;
    sizes.set(name, r.size);
    versions[name] = t.def.version;
    nShot[name] = cfg.numFewshot;
    higherIsBetter[name] = Object.fromEntries(
      t.def.metrics.map((m) => [m, t.def.outputType === "multiple_choice"]),
    );
    nSamples[name] = { original: t.originalSize, effective: t.docs.length };
    truncatedRequests[name] = r.truncated;
    configs[name] = {
      task: name,
      dataset_path: t.def.datasetPath,
      dataset_name: t.def.datasetName,
      test_split: t.def.testSplit,
      fewshot_split: t.def.fewshotSplit,
      data_files: [...new Set(t.docs.map((d) => d.file))],
      ...t.def.template,
      description: t.def.description,
      target_delimiter: " ",
      fewshot_delimiter: "\n\n",
      fewshot_config: { sampler: t.def.sampler === "first_n" ? "first_n" : "default" },
      num_fewshot: cfg.numFewshot,
      metric_list: t.def.metrics.map((m) => ({
        metric: m,
        aggregation: t.def.outputType === "multiple_choice"
          ? "mean"
          : m === "bits_per_byte"
          ? "bits_per_byte"
          : "weighted_perplexity",
        higher_is_better: t.def.outputType === "multiple_choice",
      })),
      output_type: t.def.outputType,
      repeats: 1,
      should_decontaminate: false,
      metadata: { version: t.def.version },
    };
  }
  // Standalone tasks appear in group_subtasks with no subtasks, as in the harness.
  for (const n of cfg.requested) if (!GROUPS.has(n)) groupSubtasks[n] = [];

  for (const g of groupsFor(cfg.requested)) {
    const kids = GROUPS.get(g)!;
    groupSubtasks[g] = kids;
    // Groups aggregate acc weighted by size; stderr pooled (pooled_sample_stderr).
    const present = kids.filter((k) => results[k] !== undefined);
    const ks = present.map((k) => sizes.get(k)!);
    const accs = present.map((k) => results[k][fmtKey("acc")] as number);
    const errs = present.map((k) => results[k][fmtStderrKey("acc")] as number);
    const entry = {
      alias: alias(g),
      [fmtKey("acc")]: weightedMean(accs, ks),
      [fmtStderrKey("acc")]: pooledSampleStderr(errs, ks),
    };
    results[g] = entry;
    groups[g] = entry;
    sizes.set(g, ks.reduce((a, b) => a + b, 0));
    versions[g] = 2;
    nShot[g] = cfg.numFewshot;
    higherIsBetter[g] = { acc: true };
  }
  // Order results like the harness prints them: each requested name, then its subtree.
  const ordered: Record<string, unknown> = {};
  const place = (n: string) => {
    if (results[n] !== undefined && !(n in ordered)) ordered[n] = results[n];
    for (const c of GROUPS.get(n) ?? []) place(c);
  };
  cfg.requested.forEach(place);

  return {
    results: ordered,
    groups,
    group_subtasks: groupSubtasks,
    configs,
    versions,
    "n-shot": nShot,
    higher_is_better: higherIsBetter,
    "n-samples": nSamples,
    truncated_requests: truncatedRequests,
    config: {
      model: cfg.model,
      model_args: cfg.modelArgs,
      batch_size: cfg.batchSize,
      batch_sizes: [],
      device: cfg.device,
      use_cache: null,
      limit: cfg.limit,
      bootstrap_iters: 0,
      gen_kwargs: null,
      random_seed: 0,
      numpy_seed: 1234,
      torch_seed: 1234,
      fewshot_seed: FEWSHOT_SEED,
    },
    git_hash: extra.gitHash,
    date: extra.startTime / 1000,
    total_evaluation_time_seconds: String(extra.seconds),
  };
}

/** The harness's markdown table (make_table): one row per metric, groups in their own table. */
export function formatTable(
  res: Record<string, unknown>,
  which: "results" | "groups" = "results",
): string {
  const table = res[which] as Record<string, Record<string, unknown>>;
  const versions = res.versions as Record<string, number>;
  const nShot = res["n-shot"] as Record<string, number>;
  const hib = res.higher_is_better as Record<string, Record<string, boolean>>;
  const header = [
    which === "groups" ? "Groups" : "Tasks",
    "Version",
    "Filter",
    "n-shot",
    "Metric",
    "",
    "Value",
    "",
    "Stderr",
  ];
  const rows: string[][] = [];
  for (const [name, entry] of Object.entries(table)) {
    let first = true;
    for (const key of Object.keys(entry)) {
      if (key === "alias" || key.includes("_stderr,")) continue;
      const [metric, filter] = key.split(",");
      const value = entry[key] as number;
      const se = entry[`${metric}_stderr,${filter}`];
      const arrow = hib[name]?.[metric] === undefined ? "" : hib[name][metric] ? "↑" : "↓";
      rows.push([
        first ? String(entry.alias ?? name) : "",
        first ? String(versions[name] ?? "") : "",
        filter,
        first ? String(nShot[name] ?? "") : "",
        metric,
        arrow,
        value.toFixed(4),
        typeof se === "number" ? "±" : "",
        typeof se === "number" ? se.toFixed(4) : "N/A",
      ]);
      first = false;
    }
  }
  const right = new Set([1, 3, 6, 8]);
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c].length)));
  const line = (cells: string[]) =>
    "|" +
    cells.map((x, c) => (right.has(c) ? x.padStart(widths[c]) : x.padEnd(widths[c]))).join("|") +
    "|";
  const sep = "|" +
    widths.map((w, c) => (right.has(c) ? "-".repeat(w - 1) + ":" : "-".repeat(w))).join("|") + "|";
  return [line(header), sep, ...rows.map(line)].join("\n");
}
