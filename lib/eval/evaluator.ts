// Build requests for tasks, score them with a LanguageModel, aggregate like
// lm-evaluation-harness, and assemble its results JSON and printed table. The version we
// match is HARNESS_VERSION; docs/evaluation.md says what that decides.

import { findSplitFiles, readSplit, type SourcedDoc, TaskDataError } from "./data.ts";
import type { LanguageModel, LoglikelihoodRequest, TokenizerLike } from "./lm.ts";
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
import { type JsonPath, pyJsonDumps } from "./pyjson.ts";
import { PyRandom } from "./pyrandom.ts";
import {
  type FieldType,
  GROUP_ALIASES,
  GROUP_VERSION,
  GROUPS,
  type TaskDef,
  TASKS,
} from "./tasks.ts";

/** The lm-evaluation-harness release whose behaviour and results shape we reproduce. */
export const HARNESS_VERSION = "0.4.9.1";
/** simple_evaluate's default fewshot_random_seed. */
export const FEWSHOT_SEED = 1234;
/**
 * simple_evaluate's default. With it the harness computes exactly our standard errors: the
 * closed form for `mean` metrics, none for perplexities (their aggregations are neither
 * bootstrappable nor closed-form), so no bootstrap draw is ever made for these tasks.
 */
export const BOOTSTRAP_ITERS = 100000;
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
  for (const p of [def.hubPath, def.datasetPath, base]) {
    if (p === undefined) continue;
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

/** The split the harness evaluates: test, else validation (Task.eval_docs). */
export function evalSplit(def: TaskDef): string {
  return (def.testSplit ?? def.validationSplit)!;
}

/** Where few-shot docs come from: fewshot_split, else training, else validation. */
export function fewshotDocsSplit(def: TaskDef): string | null {
  return def.fewshotSplit ?? def.trainingSplit ?? def.validationSplit;
}

/**
 * The harness draws one example more and drops the eval doc when the YAML's fewshot_split
 * equals its test_split, and so also when both are unset (boolq, hellaswag, piqa, winogrande,
 * rte), although their examples come from train and their docs from validation.
 */
export function drawsExtraExample(def: TaskDef): boolean {
  return def.fewshotSplit === def.testSplit;
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
  const all = await loadSplit(def, evalSplit(def), dataDir);
  const docs = all.slice(0, effectiveLimit(all.length, limit));
  let fewshotDocs: SourcedDoc[] = [];
  if (numFewshot > 0) {
    const split = fewshotDocsSplit(def);
    if (split === null) throw new TaskDataError(`task ${name} has no few-shot split`);
    fewshotDocs = await loadSplit(def, split, dataDir);
    const drawn = numFewshot + (drawsExtraExample(def) ? 1 : 0);
    if (fewshotDocs.length < drawn) {
      throw new TaskDataError(
        `task ${name}: --num-fewshot ${numFewshot} draws ${drawn} examples but the ${split} split has ${fewshotDocs.length} docs`,
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

/** Python's == on parsed JSON: dicts compare by keys and values, in any key order. */
export function sameDoc(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a), kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  const ra = a as Record<string, unknown>, rb = b as Record<string, unknown>;
  return ka.every((k) => Object.hasOwn(rb, k) && sameDoc(ra[k], rb[k]));
}

/**
 * ContextSampler.get_context: draw n (or n + 1, see drawsExtraExample) few-shot docs, drop
 * any equal to the eval doc, keep the first n. Returns the prefix: examples joined by
 * "\n\n", ending with "\n\n" (empty for 0-shot, which draws nothing).
 */
function fewshotPrefix(task: LoadedTask, doc: SourcedDoc, n: number, rnd: PyRandom): string {
  if (n === 0) return "";
  const def = task.def;
  const drawn = n + (drawsExtraExample(def) ? 1 : 0);
  const picked = def.sampler === "first_n"
    ? task.fewshotDocs.slice(0, drawn)
    : rnd.sample(task.fewshotDocs, drawn);
  const selected = picked.filter((x) => !sameDoc(x.doc, doc.doc)).slice(0, n);
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
          filtered_resps: [ll],
          filter: "none",
          metrics: def.metrics,
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
        // doc_to_target: the gold index, or for winogrande the shared continuation text.
        target: def.multipleInputContinuation
          ? def.multipleInputContinuation(inst.doc.doc)
          : inst.gold,
        arguments: inst.requests.map((r) => [r.context, r.continuation]),
        resps: res.map((r) => [[r.logprob, r.isGreedy]]),
        filtered_resps: res.map((r) => [r.logprob, r.isGreedy]),
        filter: "none",
        metrics: def.metrics,
        ...Object.fromEntries(def.metrics.map((m) => [m, scores[m as "acc" | "acc_norm"]])),
      });
    }
    const metrics = Object.fromEntries(def.metrics.map((m) => [m, mean(per[m])]));
    // One doc has no sample standard deviation; the harness writes "N/A" then.
    const stderrs = Object.fromEntries(
      def.metrics.map((m) => [m, per[m].length > 1 ? meanStderr(per[m]) : "N/A" as const]),
    );
    out.set(def.name, { metrics, stderrs, samples, truncated, size: instances[k].length });
  });
  return out;
}

export interface RunConfig {
  /** config.model, also written as model_source (the harness's --model, "hf" there). */
  model: string;
  modelArgs: string;
  batchSize: number;
  device: string;
  limit: number | null;
  numFewshot: number;
  requested: string[];
}

export interface RunInfo {
  gitHash: string | null;
  /** Wall-clock start in seconds since the epoch (the harness's `date`, time.time()). */
  date: number;
  /** A monotonic clock in seconds at start and end (the harness's perf_counter values). */
  startTime: number;
  endTime: number;
  /** add_tokenizer_info's keys (harnessTokenizerInfo), when a real tokenizer ran. */
  tokenizer?: Record<string, unknown>;
}

/** The harness's add_tokenizer_info: [token, str(id)] pairs, eot_token_id and max_length. */
export function harnessTokenizerInfo(
  tok: TokenizerLike & { padId: number | null },
  maxLength: number,
): Record<string, unknown> {
  const entry = (
    id: number | null,
  ) => [id === null ? null : tok.decode([id]), String(id ?? "None")];
  // HFLM pads with the pad token, else unk, else EOS; our tokenizers name no unk token.
  return {
    tokenizer_pad_token: entry(tok.padId ?? tok.eosId),
    tokenizer_eos_token: entry(tok.eosId),
    tokenizer_bos_token: entry(tok.bosId),
    eot_token_id: tok.eosId,
    max_length: maxLength,
  };
}

/** The evaluation tracker's model_name: the value of pretrained= (or peft=, ...) in model_args. */
export function modelNameFromArgs(modelArgs: string): string {
  for (const prefix of ["peft=", "delta=", "pretrained=", "model=", "path=", "engine="]) {
    if (modelArgs.includes(prefix)) return modelArgs.split(prefix)[1].split(",")[0];
  }
  return "";
}

/** Groups touched by the requested names, innermost first. */
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

/** A group's tasks at every depth (the harness aggregates a group over these, not subgroups). */
function leafTasks(group: string): string[] {
  return GROUPS.get(group)!.flatMap((c) => (GROUPS.has(c) ? leafTasks(c) : [c]));
}

const fmtKey = (metric: string) => `${metric},none`;
const fmtStderrKey = (metric: string) => `${metric}_stderr,none`;
const byName = <T>(entries: Record<string, T>) =>
  Object.fromEntries(Object.entries(entries).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));

/** The harness's results dictionary (evaluate + simple_evaluate + the evaluation tracker). */
export function buildResults(
  cfg: RunConfig,
  tasks: LoadedTask[],
  scored: Map<string, TaskResult>,
  run: RunInfo,
): Record<string, unknown> {
  const results: Record<string, Record<string, unknown>> = {};
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
  // task_alias / group_alias (else the name), after "- " indented by depth (prepare_print_tasks).
  const alias = (name: string) => {
    const d = depth.get(name) ?? 0;
    const shown = GROUPS.has(name)
      ? GROUP_ALIASES.get(name) ?? name
      : TASKS.get(name)?.alias ?? name;
    return (d > 0 ? " ".repeat(d) + "- " : "") + shown;
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
    // TaskConfig.to_dict leaves out unset (None) fields.
    const config: Record<string, unknown> = {
      task: name,
      task_alias: t.def.alias,
      dataset_path: t.def.datasetPath,
      dataset_name: t.def.datasetName,
      training_split: t.def.trainingSplit,
      validation_split: t.def.validationSplit,
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
    configs[name] = Object.fromEntries(
      Object.entries(config).filter(([, v]) => v !== null && v !== undefined),
    );
  }
  // Standalone tasks appear in group_subtasks with no subtasks, as in the harness.
  for (const n of cfg.requested) if (!GROUPS.has(n)) groupSubtasks[n] = [];

  for (const g of groupsFor(cfg.requested)) {
    groupSubtasks[g] = GROUPS.get(g)!;
    // consolidate_group_results: acc averaged over all the group's tasks weighted by size, and
    // pooled_sample_stderr over the same tasks (the 57 subjects for mmlu, not its 4 groups);
    // "N/A" if any task has none.
    const leaves = leafTasks(g).filter((k) => results[k] !== undefined);
    const ks = leaves.map((k) => sizes.get(k)!);
    const accs = leaves.map((k) => results[k][fmtKey("acc")] as number);
    const errs = leaves.map((k) => results[k][fmtStderrKey("acc")] as number | "N/A");
    results[g] = {
      alias: alias(g),
      [fmtKey("acc")]: weightedMean(accs, ks),
      [fmtStderrKey("acc")]: errs.includes("N/A")
        ? "N/A"
        : pooledSampleStderr(errs as number[], ks),
    };
    versions[g] = GROUP_VERSION;
    higherIsBetter[g] = { acc: true };
  }
  // prepare_print_tasks: names sorted at each level, each followed by its subtree.
  const ordered: Record<string, Record<string, unknown>> = {};
  const groups: Record<string, Record<string, unknown>> = {};
  const place = (n: string) => {
    if (results[n] !== undefined && !(n in ordered)) {
      ordered[n] = results[n];
      if (GROUPS.has(n)) groups[n] = results[n];
    }
    for (const c of [...(GROUPS.get(n) ?? [])].sort()) place(c);
  };
  [...cfg.requested].sort().forEach(place);

  const modelName = modelNameFromArgs(cfg.modelArgs);
  return {
    results: ordered,
    ...(Object.keys(groups).length > 0 ? { groups } : {}),
    group_subtasks: groupSubtasks,
    configs: byName(configs),
    versions: byName(versions),
    "n-shot": byName(nShot),
    higher_is_better: byName(higherIsBetter),
    "n-samples": nSamples,
    config: {
      model: cfg.model,
      model_args: cfg.modelArgs,
      batch_size: cfg.batchSize,
      batch_sizes: [],
      device: cfg.device,
      use_cache: null,
      limit: cfg.limit,
      bootstrap_iters: BOOTSTRAP_ITERS,
      gen_kwargs: null,
      random_seed: 0,
      numpy_seed: 1234,
      torch_seed: 1234,
      fewshot_seed: FEWSHOT_SEED,
    },
    git_hash: run.gitHash,
    date: run.date,
    ...run.tokenizer,
    model_source: cfg.model,
    model_name: modelName,
    model_name_sanitized: modelName.replace(/["<>:/|\\?*[\]]+/g, "__"),
    system_instruction: null,
    system_instruction_sha: null,
    fewshot_as_multiturn: false,
    chat_template: null,
    chat_template_sha: null,
    start_time: run.startTime,
    end_time: run.endTime,
    total_evaluation_time_seconds: String(run.endTime - run.startTime),
    // Ours, not the harness's:
    lm_eval_version_matched: HARNESS_VERSION,
    truncated_requests: truncatedRequests,
  };
}

/**
 * The results file's text as the harness writes it (json.dumps, indent 2): metrics, task
 * versions (the YAMLs' `version: 1.0`), times and --limit are Python floats, so 1 prints 1.0.
 */
export function harnessJson(results: Record<string, unknown>): string {
  const isFloat = (p: JsonPath) => {
    const [top, a, b, c] = p;
    if (top === "results" || top === "groups") return p.length === 3 && String(b).includes(",");
    if (top === "versions") return p.length === 2 && !GROUPS.has(String(a));
    if (top === "configs") return p.length === 4 && b === "metadata" && c === "version";
    if (top === "config") return p.length === 2 && a === "limit";
    return p.length === 1 && (top === "date" || top === "start_time" || top === "end_time");
  };
  return pyJsonDumps(results, isFloat);
}

/** The harness's markdown table (make_table): one row per metric, groups in their own table. */
export function formatTable(
  res: Record<string, unknown>,
  which: "results" | "groups" = "results",
): string {
  const table = (res[which] ?? {}) as Record<string, Record<string, unknown>>;
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
    // make_table sorts an entry's metric keys.
    for (const key of Object.keys(entry).sort()) {
      if (key === "alias" || key.includes("_stderr,")) continue;
      const [metric, filter] = key.split(",");
      const value = entry[key] as number;
      const seKey = `${metric}_stderr,${filter}`;
      const se = entry[seKey];
      const arrow = hib[name]?.[metric] === undefined ? "" : hib[name][metric] ? "↑" : "↓";
      rows.push([
        first ? String(entry.alias ?? name) : "",
        first ? String(versions[name] ?? "N/A") : "",
        filter,
        String(nShot[name] ?? ""), // make_table repeats n-shot on every row of a task
        metric,
        arrow,
        value.toFixed(4),
        seKey in entry ? "±" : "",
        typeof se === "number" ? se.toFixed(4) : se === "N/A" ? "N/A" : "",
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
