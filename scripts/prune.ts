// Expert pruning (docs/expert-pruning.md): remove the same number of routed experts from
// every MoE layer, ranked by a saliency criterion recorded in the profile pass, and write
// a checkpoint of the same architecture with fewer experts.

import { parseCli, runMain } from "../lib/cli.ts";
import { resultsHeader, resultsPath, writeJsonAtomic } from "../lib/io/results.ts";
import { choiceFlag, intFlag, UsageError } from "../lib/methods/cli.ts";
import { CRITERIA, type Criterion } from "../lib/methods/expert_saliency.ts";
import { pruneFromFile } from "../lib/methods/prune_job.ts";

const PRUNE_KIND = "expert-prune";
const PRUNE_SCHEMA = 1;

const HELP =
  `Usage: deno task prune (--profile FILE | --search FILE) (--keep N | --ratio R) --out DIR [options]

Writes an HF-layout checkpoint folder in which every MoE layer keeps the same number of
its routed experts: the most salient by --criterion, renumbered in their original order,
with the matching router rows. Shared experts stay. config.json changes only the number of
routed experts (n_routed_experts / num_experts / num_local_experts) and, with --top-k,
num_experts_per_tok, and records the pruning under "expert_pruning"; transformers, vLLM
and deno task eval load it as an ordinary smaller model. Weights keep their dtype;
tokenizer files are copied. Prints real bytes before/after.

Options:
  --profile FILE   results/profile/<date>-<name>.json from deno task profile
  --search FILE    results/search/<date>-<name>.json from deno task search (its profile pass)
  --criterion C    ${CRITERIA.join(", ")} (default reap):
                     reap       mean over an expert's tokens of routing weight x ||output||
                     frequency  how many tokens route to the expert
                     weight     mean routing weight over those tokens
                     norm       mean ||output|| over those tokens
  --keep N         routed experts kept per MoE layer
  --ratio R        fraction of routed experts removed per layer, 0 < R < 1 (rounded down)
  --top-k K        experts per token in the pruned model (default: the model's; at most
                   the kept experts)
  --out DIR        output folder; must not exist (required)
  --model DIR      source model (default: the path recorded in the file; must match its
                   hash, or be a checkpoint condensed from that model: then the MoE layers
                   it still has are pruned)
  --results DIR    where to record the run (default results; writes results/prune/)
  -h, --help       this help
`;

await runMain(async () => {
  const values = parseCli(HELP, {
    profile: { type: "string" },
    search: { type: "string" },
    criterion: { type: "string" },
    keep: { type: "string" },
    ratio: { type: "string" },
    "top-k": { type: "string" },
    out: { type: "string" },
    model: { type: "string" },
    results: { type: "string" },
  });
  if (!values.profile === !values.search) {
    throw new UsageError("give one of --profile FILE or --search FILE (see --help)");
  }
  if (!values.out) throw new UsageError("--out is required (see --help)");
  const t0 = performance.now();
  const criterion = choiceFlag<Criterion>(values.criterion, "--criterion", CRITERIA, "reap");
  let ratio: number | undefined;
  if (values.ratio !== undefined) {
    ratio = Number(values.ratio);
    if (!Number.isFinite(ratio) || values.ratio.trim() === "") {
      throw new UsageError(`--ratio: expected a number, got "${values.ratio}"`);
    }
  }
  const source = values.profile
    ? { kind: "profile" as const, path: values.profile }
    : { kind: "search" as const, path: values.search! };
  const r = await pruneFromFile({
    source,
    model: values.model,
    criterion,
    keep: values.keep === undefined ? undefined : intFlag(values.keep, "--keep", 0, 1),
    ratio,
    topK: values["top-k"] === undefined ? undefined : intFlag(values["top-k"], "--top-k", 0, 1),
  }, values.out);
  const keep = [...r.pruning.kept.values()][0].length;
  const pct = (100 * r.bytesAfter / r.bytesBefore).toFixed(1);
  console.log(
    `kept ${keep} of ${r.experts} routed experts in ${r.pruning.kept.size} MoE layers ` +
      `by ${criterion}, top-${r.pruning.topK}`,
  );
  console.log(
    `weights: ${r.bytesBefore} bytes -> ${r.bytesAfter} bytes (${pct}%), ${r.params} parameters`,
  );
  const name = values.out.replace(/\/+$/, "").split("/").pop()!;
  const record = resultsPath(values.results ?? "results", "prune", name);
  await writeJsonAtomic(record, {
    ...await resultsHeader(PRUNE_KIND, PRUNE_SCHEMA),
    out: values.out,
    ...r.provenance,
    experts_before: r.experts,
    experts_after: keep,
    top_k: r.pruning.topK,
    kept: Object.fromEntries(r.pruning.kept),
    bytes_before: r.bytesBefore,
    bytes_after: r.bytesAfter,
    params_after: r.params,
    wall_seconds: (performance.now() - t0) / 1000,
  });
  console.log(`wrote ${values.out} and ${record}`);
});
