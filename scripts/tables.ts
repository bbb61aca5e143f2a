// deno task tables: the CD-MoE paper's comparison on one model and task set. For each
// configuration (unpruned; LayerDrop, BlockDrop, CD-MoE-S, CD-MoE-SR with n changed
// layers, orders from a search result; expert pruning by each criterion at a few ratios,
// and CD-MoE-SR combined with REAP pruning of the layers left sparse) it writes a real
// checkpoint, scores the tasks
// like lm-evaluation-harness, and measures weight bytes, active parameters and prefill
// speed side by side in one run. Output: a Markdown table in the paper's columns, an SVG
// plot of average score against memory (the paper's Figure 2), and versioned JSON.

import { createBackend, parseCli, runMain, UsageError } from "../lib/cli.ts";
import { loadTask, REPO_ROOT, scoreTasks } from "../lib/eval/evaluator.ts";
import { ModelLM } from "../lib/eval/lm.ts";
import { countParams, prefillRounds, weightBytes } from "../lib/eval/measure.ts";
import { SHIPPED_TASKS, TASKS } from "../lib/eval/tasks.ts";
import { readResults, resultsHeader, writeJsonAtomic, writeTextAtomic } from "../lib/io/results.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { Model } from "../lib/model/model.ts";
import { condenseFromSearch } from "../lib/methods/condense_job.ts";
import { CRITERIA, type Criterion } from "../lib/methods/expert_saliency.ts";
import { pruneFromFile, readSaliency } from "../lib/methods/prune_job.ts";
import { type Variant, VARIANTS } from "../lib/methods/layer_search.ts";
import { SEARCH_KIND, SEARCH_SCHEMA } from "../lib/methods/search_job.ts";

const USAGE = `Usage: deno task tables [options]

Runs the grid unpruned + {variants} x {layers} + {prune criteria} x {prune ratios} +
CD-MoE-SR {combine layers} x REAP {prune ratios}, and writes
results/tables/<date>-<model>.{md,svg,json}.

  --search FILE      search results (default: the newest results/search/*-<model>.json)
  --model DIR        the searched model, if it has moved (must match the search's hash)
  --variants LIST    layerdrop,blockdrop,s,sr (default all four)
  --layers LIST      numbers of changed layers (default 1,2,3)
  --profile FILE     expert saliency for the pruning rows (default: the search's, else the
                     newest results/profile/*-<model>.json from deno task profile)
  --prune-criteria LIST  ${CRITERIA.join(",")} (default all; none: no pruning rows)
  --prune-ratios LIST    fractions of routed experts removed per layer (default 0.25,0.5)
  --combine-layers LIST  CD-MoE-SR on n layers + REAP pruning of the MoE layers left, at
                     each prune ratio (default 1,2,3; none: no combined rows)
  --tasks LIST       harness task names (default the shipped tasks: ${SHIPPED_TASKS.join(",")})
  --data-dir DIR     downloaded HF datasets for non-shipped tasks (default data/hf)
  --limit N          documents per task (default all)
  --batch-size N     loglikelihood batch (default 8)
  --backend NAME     cpu (default), cpu-reference, webgpu
  --models LIST      extra rows LABEL=DIR,... (e.g. compressed-expert variants from
                     scripts/compressed_experts.ts), scored and measured with the grid
  --work-dir DIR     where the grid's checkpoints are written (default results/tmp/tables)
  --out-dir DIR      default results/tables`;

const KIND = "tables", SCHEMA_VERSION = 1;
const LABEL: Record<Variant | "unpruned", string> = {
  unpruned: "Unpruned",
  layerdrop: "LayerDrop",
  blockdrop: "BlockDrop",
  s: "CD-MoE-S",
  sr: "CD-MoE-SR",
};
const CRITERION_LABEL: Record<Criterion, string> = {
  reap: "REAP",
  frequency: "Frequency",
  weight: "Weight",
  norm: "Norm",
};
const PRUNE_COLORS: Record<Criterion, string> = {
  reap: "#9467bd",
  frequency: "#8c564b",
  weight: "#e377c2",
  norm: "#17becf",
};
const COMBINED_COLORS = ["#bcbd22", "#393b79", "#637939", "#843c39"];
/** The criterion the combined rows prune by. */
const COMBINE_CRITERION: Criterion = "reap";
// Prefill speed: batch x prompt tokens, median over interleaved rounds.
const SPEED = { batch: 4, prompt: 128, rounds: 5 };
// The paper reports acc_norm for these and acc for the rest (docs/evaluation.md).
const ACC_NORM_TASKS = new Set(["arc_challenge", "hellaswag", "openbookqa"]);

/** prune-<criterion>: expert pruning; combined-<ratio>: CD-MoE-SR + REAP at that ratio. */
type Method = Variant | "unpruned" | "model" | `prune-${Criterion}` | `combined-${number}`;

interface Row {
  method: Method;
  /** What the table and plot call this row. */
  label: string;
  layers: number;
  /** Pruning rows: fraction of routed experts removed from each MoE layer left. */
  pruneRatio?: number;
  dir: string;
  activeParams: number;
  weightBytes: number;
  prefillTokensPerSecond: number;
  scores: Record<string, number>;
  stderrs: Record<string, number>;
}

function newestResult(kind: "search" | "profile", modelName: string): string | null {
  const dir = `${REPO_ROOT}/results/${kind}`;
  const files: string[] = [];
  try {
    for (const e of Deno.readDirSync(dir)) {
      if (e.name.endsWith(`-${modelName}.json`)) files.push(e.name);
    }
  } catch { /* no results yet */ }
  return files.length ? `${dir}/${files.sort().at(-1)}` : null;
}

function newestSearch(modelName: string): string {
  const found = newestResult("search", modelName);
  if (found) return found;
  throw new UsageError(
    `no search results for ${modelName} in ${REPO_ROOT}/results/search: run \`deno task search\` first or pass --search`,
  );
}

/** Where the pruning rows' saliency comes from: --profile, the search, or the newest profile. */
async function saliencySource(
  profile: string | undefined,
  search: string,
  modelName: string,
): Promise<{ kind: "profile" | "search"; path: string }> {
  if (profile) return { kind: "profile", path: profile };
  const fromSearch = await readSaliency(search, "search");
  if (Object.values(fromSearch.layers).every((l) => l.reap !== undefined)) {
    return { kind: "search", path: search };
  }
  const found = newestResult("profile", modelName);
  if (found) return { kind: "profile", path: found };
  throw new UsageError(
    `${search} has no expert saliency (searched before it was recorded) and there is no ` +
      `results/profile/*-${modelName}.json: run \`deno task profile\`, pass --profile, or ` +
      `--prune-criteria none --combine-layers none`,
  );
}

function list(value: string | undefined, fallback: string): string[] {
  return (value ?? fallback).split(",").map((s) => s.trim()).filter(Boolean);
}

await runMain(async () => {
  const args = parseCli(USAGE, {
    search: { type: "string" },
    variants: { type: "string" },
    layers: { type: "string" },
    tasks: { type: "string" },
    "data-dir": { type: "string" },
    limit: { type: "string" },
    "batch-size": { type: "string" },
    backend: { type: "string" },
    "work-dir": { type: "string" },
    models: { type: "string" },
    "out-dir": { type: "string" },
    model: { type: "string" },
    profile: { type: "string" },
    "prune-criteria": { type: "string" },
    "prune-ratios": { type: "string" },
    "combine-layers": { type: "string" },
  });
  const variants = list(args.variants, "layerdrop,blockdrop,s,sr") as Variant[];
  for (const v of variants) {
    if (!VARIANTS.includes(v)) {
      throw new UsageError(`unknown variant "${v}" (${VARIANTS.join(", ")})`);
    }
  }
  const layerCounts = list(args.layers, "1,2,3").map(Number);
  if (layerCounts.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new UsageError(`--layers must list positive integers`);
  }
  const none = (v: string | undefined) => v?.trim() === "none";
  const criteria = none(args["prune-criteria"])
    ? []
    : list(args["prune-criteria"], CRITERIA.join(",")) as Criterion[];
  for (const c of criteria) {
    if (!CRITERIA.includes(c)) {
      throw new UsageError(`unknown prune criterion "${c}" (${CRITERIA.join(", ")}, or none)`);
    }
  }
  const pruneRatios = list(args["prune-ratios"], "0.25,0.5").map(Number);
  if (pruneRatios.some((r) => !(r > 0 && r < 1))) {
    throw new UsageError(`--prune-ratios must list fractions in (0, 1)`);
  }
  const combineLayers = none(args["combine-layers"])
    ? []
    : list(args["combine-layers"], "1,2,3").map(Number);
  if (combineLayers.some((n) => !Number.isInteger(n) || n < 1)) {
    throw new UsageError(`--combine-layers must list positive integers (or none)`);
  }
  const taskNames = list(args.tasks, SHIPPED_TASKS.join(","));
  for (const t of taskNames) if (!TASKS.has(t)) throw new UsageError(`unknown task "${t}"`);
  const limit = args.limit === undefined ? null : Number(args.limit);
  const batchSize = Number(args["batch-size"] ?? 8);

  const defaultModel = `${REPO_ROOT}/data/models/tiny-deepseek-moe`;
  const search = args.search ?? newestSearch(defaultModel.split("/").pop()!);
  const searchResult = await readResults(search, SEARCH_KIND, SEARCH_SCHEMA);
  const source = args.model ?? (searchResult.model as { path: string }).path;
  const modelName = source.replace(/\/+$/, "").split("/").pop()!;
  const workDir = args["work-dir"] ?? `${REPO_ROOT}/results/tmp/tables`;
  const outDir = args["out-dir"] ?? `${REPO_ROOT}/results/tables`;
  const tasks = await Promise.all(
    taskNames.map((t) => loadTask(t, args["data-dir"] ?? "data/hf", limit, 0)),
  );

  // Every configuration becomes a real checkpoint, so bytes and speed are what a user ships.
  type GridRow = Pick<Row, "method" | "label" | "layers" | "dir" | "pruneRatio">;
  const grid: GridRow[] = [
    { method: "unpruned", label: LABEL.unpruned, layers: 0, dir: source },
  ];
  await Deno.remove(workDir, { recursive: true }).catch(() => {});
  for (const variant of variants) {
    for (const n of layerCounts) {
      const dir = `${workDir}/${variant}-${n}`;
      await condenseFromSearch({ search, model: args.model, variant, layers: n }, dir);
      grid.push({ method: variant, label: LABEL[variant], layers: n, dir });
    }
  }
  // Expert pruning, and CD-MoE-SR's layers condensed with the layers left pruned.
  const saliency = criteria.length || combineLayers.length
    ? await saliencySource(args.profile, search, modelName)
    : null;
  const pct = (r: number) => `${+(100 * r).toFixed(1)}%`;
  for (const criterion of criteria) {
    for (const ratio of pruneRatios) {
      const dir = `${workDir}/prune-${criterion}-${ratio}`;
      await pruneFromFile({ source: saliency!, model: source, criterion, ratio }, dir);
      const label = `${CRITERION_LABEL[criterion]} ${pct(ratio)}`;
      grid.push({ method: `prune-${criterion}`, label, layers: 0, dir, pruneRatio: ratio });
    }
  }
  for (const n of combineLayers) {
    const condensed = `${workDir}/sr-${n}`;
    if (!grid.some((g) => g.dir === condensed)) {
      await condenseFromSearch({ search, model: args.model, variant: "sr", layers: n }, condensed);
    }
    for (const ratio of pruneRatios) {
      const dir = `${workDir}/sr-${n}+${COMBINE_CRITERION}-${ratio}`;
      await pruneFromFile(
        { source: saliency!, model: condensed, criterion: COMBINE_CRITERION, ratio },
        dir,
      );
      const label = `${LABEL.sr} + ${CRITERION_LABEL[COMBINE_CRITERION]} ${pct(ratio)}`;
      grid.push({ method: `combined-${ratio}`, label, layers: n, dir, pruneRatio: ratio });
    }
  }

  for (const entry of list(args.models, "")) {
    const [label, dir] = entry.split("=");
    if (!label || !dir) throw new UsageError(`--models: "${entry}" is not LABEL=DIR`);
    grid.push({ method: "model", label, layers: 0, dir });
  }

  const backend = await createBackend(args.backend);
  const tokenizer = await loadTokenizer(source);
  const rows: Row[] = [];
  const t0 = performance.now();
  for (const [i, cfg] of grid.entries()) {
    console.error(
      `[${i + 1}/${grid.length}] ${cfg.label} ${cfg.layers || ""}: scoring ${taskNames.join(", ")}`,
    );
    const model = await Model.load(cfg.dir, backend);
    const scored = await scoreTasks(new ModelLM(model, tokenizer, { batchSize }), tasks, 0);
    const params = countParams(model), bytes = weightBytes(model);
    model.close();
    const metricOf = (t: string) => (ACC_NORM_TASKS.has(t) ? "acc_norm" : "acc");
    rows.push({
      ...cfg,
      activeParams: params.active,
      weightBytes: bytes,
      prefillTokensPerSecond: 0, // measured below, all models side by side
      scores: Object.fromEntries(taskNames.map((t) => [t, scored.get(t)!.metrics[metricOf(t)]])),
      stderrs: Object.fromEntries(
        taskNames.map((t) => [t, scored.get(t)!.stderrs[metricOf(t)] as number]),
      ),
    });
    const elapsed = (performance.now() - t0) / 1000;
    console.error(
      `  done; elapsed ${elapsed.toFixed(0)} s, ETA ${
        ((elapsed / (i + 1)) * (grid.length - i - 1)).toFixed(0)
      } s`,
    );
  }

  console.error(`speed: ${SPEED.rounds} interleaved rounds of every model ...`);
  const speeds = await prefillRounds(grid.map((g) => g.dir), backend, SPEED);
  rows.forEach((r, i) => (r.prefillTokensPerSecond = speeds[i]));

  const stem = `${new Date().toISOString().slice(0, 10)}-${modelName}`;
  const markdown = markdownTable(
    rows,
    taskNames,
    search,
    backend.description,
    saliency?.path ?? null,
  );
  await writeTextAtomic(`${outDir}/${stem}.md`, markdown);
  await writeTextAtomic(`${outDir}/${stem}.svg`, svgPlot(rows, modelName));
  await writeJsonAtomic(`${outDir}/${stem}.json`, {
    ...(await resultsHeader(KIND, SCHEMA_VERSION)),
    settings: {
      search,
      variants,
      layers: layerCounts,
      saliency: saliency?.path ?? null,
      prune_criteria: criteria,
      prune_ratios: pruneRatios,
      combine_layers: combineLayers,
      combine_criterion: COMBINE_CRITERION,
      tasks: taskNames,
      limit,
      batch_size: batchSize,
      backend: backend.description,
    },
    metric_per_task: Object.fromEntries(
      taskNames.map((t) => [t, ACC_NORM_TASKS.has(t) ? "acc_norm" : "acc"]),
    ),
    rows,
    wall_seconds: (performance.now() - t0) / 1000,
  });
  console.log(markdown);
  console.error(`wrote ${outDir}/${stem}.{md,svg,json}`);
});

function average(r: Row): number {
  const xs = Object.values(r.scores);
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

function markdownTable(
  rows: Row[],
  tasks: string[],
  search: string,
  device: string,
  saliency: string | null,
): string {
  const base = rows[0], baseAvg = average(base);
  const pct = (x: number) => `${(100 * x).toFixed(1)}`;
  const head = ["Method", "#L", "Active params", "MEM", "Speed", ...tasks, "AVG", "% of unpruned"];
  const lines = [
    `| ${head.join(" | ")} |`,
    `|${head.map((_, i) => (i < 2 ? "---" : "---:")).join("|")}|`,
    ...rows.map((r) =>
      `| ${r.label} | ${r.layers || "–"} | ${(r.activeParams / 1e6).toFixed(2)}M | ` +
      `${pct(r.weightBytes / base.weightBytes)}% | ` +
      `${(r.prefillTokensPerSecond / base.prefillTokensPerSecond).toFixed(2)}× | ` +
      tasks.map((t) => `${pct(r.scores[t])} ±${pct(r.stderrs[t])}`).join(" | ") +
      ` | ${pct(average(r))} | ${pct(average(r) / baseAvg)}% |`
    ),
  ];
  return `${
    lines.join("\n")
  }\n\nScores in % (acc; acc_norm for ARC-C, HellaSwag, OBQA) ± standard error. ` +
    `MEM: weight bytes relative to the unpruned model. Speed: prefill tokens/s relative to unpruned ` +
    `(batch ${SPEED.batch} × ${SPEED.prompt}, median of ${SPEED.rounds} interleaved rounds, ${device}). Layer orders from ${
      search.split("/").pop()
    }.${pruningNote(rows, saliency)}\n`;
}

function pruningNote(rows: Row[], saliency: string | null): string {
  if (!rows.some((r) => r.pruneRatio !== undefined)) return "";
  return ` Expert pruning (docs/expert-pruning.md): "REAP 25%" removes 25% of the routed ` +
    `experts of every MoE layer, the least salient by that criterion; "CD-MoE-SR + REAP" ` +
    `condenses #L layers and prunes the MoE layers left. Saliency from ${
      saliency?.split("/").pop()
    }.`;
}

/** Average score against memory, one line per method (the paper's Figure 2). */
function svgPlot(rows: Row[], modelName: string): string {
  const W = 640, H = 420, L = 60, R = 150, T = 40, B = 50;
  const xs = rows.map((r) => r.weightBytes / rows[0].weightBytes), ys = rows.map(average);
  const xMin = Math.min(...xs) - 0.05, xMax = 1.02;
  const yMin = Math.floor(Math.min(...ys) * 20) / 20, yMax = Math.ceil(Math.max(...ys) * 20) / 20;
  const px = (x: number) => L + ((x - xMin) / (xMax - xMin)) * (W - L - R);
  const py = (y: number) => H - B - ((y - yMin) / (yMax - yMin || 1)) * (H - T - B);
  const colors: Record<string, string> = {
    layerdrop: "#d62728",
    blockdrop: "#ff7f0e",
    s: "#1f77b4",
    sr: "#2ca02c",
  };
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${L}" y="20" font-size="14">${modelName}: average score vs memory</text>`,
    `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="black"/>`,
    `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="black"/>`,
    `<text x="${(L + W - R) / 2}" y="${
      H - 12
    }" text-anchor="middle">memory (weight bytes, fraction of unpruned)</text>`,
    `<text x="16" y="${(T + H - B) / 2}" transform="rotate(-90 16 ${
      (T + H - B) / 2
    })" text-anchor="middle">average score</text>`,
  ];
  for (let i = 0; i <= 5; i++) {
    const x = xMin + ((xMax - xMin) * i) / 5, y = yMin + ((yMax - yMin) * i) / 5;
    parts.push(`<text x="${px(x)}" y="${H - B + 16}" text-anchor="middle">${x.toFixed(2)}</text>`);
    parts.push(`<text x="${L - 6}" y="${py(y) + 4}" text-anchor="end">${y.toFixed(3)}</text>`);
  }
  const base = rows[0];
  // One line per method from the unpruned point: the layer methods by layers changed,
  // pruning (dashed) by ratio, and each combined ratio (dotted) from its pure-pruning
  // point by layers condensed.
  const series: { label: string; color: string; dash: string; pts: Row[] }[] = [];
  for (const [method, color] of Object.entries(colors)) {
    const pts = rows.filter((r) => r.method === method);
    series.push({ label: LABEL[method as Variant], color, dash: "", pts: [base, ...pts] });
  }
  for (const [criterion, color] of Object.entries(PRUNE_COLORS)) {
    const pts = rows.filter((r) => r.method === `prune-${criterion}`)
      .sort((a, b) => a.pruneRatio! - b.pruneRatio!);
    const label = `Prune: ${CRITERION_LABEL[criterion as Criterion]}`;
    series.push({ label, color, dash: "6 3", pts: [base, ...pts] });
  }
  const combinedRatios = [
    ...new Set(rows.filter((r) => r.method.startsWith("combined-")).map((r) => r.pruneRatio!)),
  ];
  combinedRatios.forEach((ratio, i) => {
    const start = rows.find((r) =>
      r.method === `prune-${COMBINE_CRITERION}` && r.pruneRatio === ratio
    );
    const pts = rows.filter((r) => r.method === `combined-${ratio}`).sort((a, b) =>
      a.layers - b.layers
    );
    const label = `SR + ${CRITERION_LABEL[COMBINE_CRITERION]} ${+(100 * ratio).toFixed(1)}%`;
    const color = COMBINED_COLORS[i % COMBINED_COLORS.length];
    series.push({ label, color, dash: "2 3", pts: start ? [start, ...pts] : pts });
  });
  series.filter((s) => s.pts.length >= 2).forEach(({ label, color, dash, pts }, i) => {
    const coords = pts.map((r) => `${px(r.weightBytes / base.weightBytes)},${py(average(r))}`);
    const dashed = dash ? ` stroke-dasharray="${dash}"` : "";
    parts.push(
      `<polyline points="${
        coords.join(" ")
      }" fill="none" stroke="${color}" stroke-width="2"${dashed}/>`,
    );
    for (const c of coords) {
      parts.push(
        `<circle cx="${c.split(",")[0]}" cy="${c.split(",")[1]}" r="3.5" fill="${color}"/>`,
      );
    }
    parts.push(
      `<rect x="${W - R + 15}" y="${T + i * 20}" width="12" height="12" fill="${color}"/>`,
    );
    parts.push(`<text x="${W - R + 32}" y="${T + i * 20 + 10}">${label}</text>`);
  });
  for (const r of rows.filter((r) => r.method === "model")) {
    const x = px(r.weightBytes / base.weightBytes), y = py(average(r));
    parts.push(`<rect x="${x - 4}" y="${y - 4}" width="8" height="8" fill="#7f7f7f"/>`);
    parts.push(`<text x="${x + 7}" y="${y + 4}">${r.label}</text>`);
  }
  parts.push("</svg>\n");
  return parts.join("\n");
}
