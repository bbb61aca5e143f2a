// Write a condensed checkpoint (CD-MoE 1b) from a search results file: the first N
// layers of a variant's greedy order become dense SwiGLU MLPs (or are dropped).

import { parseCli, runMain } from "../lib/cli.ts";
import { resultsHeader, resultsPath, writeJsonAtomic } from "../lib/io/results.ts";
import { choiceFlag, intFlag, sizeFlag, UsageError } from "../lib/methods/cli.ts";
import { condenseFromSearch } from "../lib/methods/condense_job.ts";
import { type Variant, VARIANTS } from "../lib/methods/layer_search.ts";

const HELP = `Usage: deno run -A scripts/condense.ts --search FILE --layers N --out DIR [options]

Writes an HF-layout checkpoint folder where the first N layers of the chosen variant's
greedy order are condensed (one dense SwiGLU MLP: shared + kept experts, each kept
expert's down-projection scaled by its wbar = avg_w) or dropped. Weights stay in the
source dtype (bf16 stays bf16: the wbar fold-in is rounded once). config.json records
the changes under "cdmoe"; tokenizer files are copied. Prints real bytes before/after.
Weights are written one tensor at a time, as model-0000i-of-0000n.safetensors shards with
model.safetensors.index.json when the source is sharded or they pass --max-shard-size,
else one model.safetensors (as Hugging Face's save_pretrained).

Options:
  --search FILE   results/search/<date>-<name>.json from deno task search (required)
  --layers N      number of layers to change, from the start of the order (required)
  --out DIR       output folder; must not exist (required)
  --variant V     ${VARIANTS.join(", ")} (default sr)
  --experts K     experts kept per layer for sr (default: the search's k)
  --model DIR     source model (default: the path recorded in the search; must match its hash)
  --max-shard-size SIZE  largest shard, e.g. 5GB, 500MB, 1GiB (default 5GB)
  --results DIR   where to record the run (default results; writes results/condense/)
  -h, --help      this help
`;

await runMain(async () => {
  const values = parseCli(HELP, {
    search: { type: "string" },
    layers: { type: "string" },
    out: { type: "string" },
    variant: { type: "string" },
    experts: { type: "string" },
    model: { type: "string" },
    results: { type: "string" },
    "max-shard-size": { type: "string" },
  });
  if (!values.search) throw new UsageError("--search is required (see --help)");
  if (!values.out) throw new UsageError("--out is required (see --help)");
  if (values.layers === undefined) throw new UsageError("--layers is required (see --help)");
  const t0 = performance.now();
  const variant = choiceFlag<Variant>(values.variant, "--variant", VARIANTS, "sr");
  const r = await condenseFromSearch({
    search: values.search,
    model: values.model,
    variant,
    layers: intFlag(values.layers, "--layers", 1),
    experts: values.experts === undefined ? undefined : intFlag(values.experts, "--experts", 0, 0),
    maxShardBytes: values["max-shard-size"] === undefined
      ? undefined
      : sizeFlag(values["max-shard-size"], "--max-shard-size"),
  }, values.out);
  const pct = (100 * r.bytesAfter / r.bytesBefore).toFixed(1);
  console.log(`changed layers: ${[...r.plan.keys()].join(", ")} (${variant}, k=${r.k})`);
  console.log(
    `weights: ${r.bytesBefore} bytes -> ${r.bytesAfter} bytes (${pct}%), ${r.params} parameters`,
  );
  const name = values.out.replace(/\/+$/, "").split("/").pop()!;
  const record = resultsPath(values.results ?? "results", "condense", name);
  await writeJsonAtomic(record, {
    ...await resultsHeader("cdmoe-condense", 1),
    out: values.out,
    ...r.provenance,
    experts: r.k,
    plan: Object.fromEntries(r.plan),
    bytes_before: r.bytesBefore,
    bytes_after: r.bytesAfter,
    params_after: r.params,
    wall_seconds: (performance.now() - t0) / 1000,
  });
  console.log(`wrote ${values.out} and ${record}`);
});
