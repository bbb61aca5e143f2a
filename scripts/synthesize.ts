// deno task synthesize: a checkpoint with a published model's exact shapes and random
// bf16 weights (lib/model/published.ts), to run the pipeline at real scale.

import { parseCli, runMain } from "../lib/cli.ts";
import { DEFAULT_MODEL, intFlag, Progress, sizeFlag, UsageError } from "../lib/methods/cli.ts";
import { PUBLISHED, synthesizeCheckpoint, synthesizedConfig } from "../lib/model/published.ts";

const HELP = `Usage: deno task synthesize --like NAME --out DIR [options]

Writes an HF-layout checkpoint folder with NAME's published config.json (its source is
recorded under "synthetic" in the written config), seeded random bf16 weights of exactly
its shapes, sharded model-0000i-of-0000n.safetensors files with
model.safetensors.index.json, and the default model's byte-level tokenizer. Streams:
one tensor is in memory at a time. Written to a temp folder renamed at the end.

Models (--like):
${
  Object.entries(PUBLISHED).map(([name, p]) =>
    `  ${name.padEnd(18)} ${p.config.num_hidden_layers} layers, ${p.config.model_type}`
  ).join("\n")
}

Options:
  --like NAME            published model to copy the shapes of (required)
  --out DIR              output folder; must not exist (required)
  --layers N             keep the first N decoder layers (default: all), so a prefix fits
  --seed N               random seed (default 0)
  --max-shard-size SIZE  largest shard, e.g. 5GB, 500MB, 1GiB (default 5GB, as HF)
  --quiet                no progress line
  -h, --help             this help
`;

await runMain(async () => {
  const v = parseCli(HELP, {
    like: { type: "string" },
    out: { type: "string" },
    layers: { type: "string" },
    seed: { type: "string" },
    "max-shard-size": { type: "string" },
    quiet: { type: "boolean" },
  });
  if (!v.like) throw new UsageError("--like is required (see --help)");
  if (!v.out) throw new UsageError("--out is required (see --help)");
  if (!PUBLISHED[v.like]) {
    throw new UsageError(
      `--like: unknown model "${v.like}" (choose one of ${Object.keys(PUBLISHED).join(", ")})`,
    );
  }
  const full = PUBLISHED[v.like].config.num_hidden_layers as number;
  const layers = v.layers === undefined ? undefined : intFlag(v.layers, "--layers", full);
  if (layers !== undefined && layers > full) {
    throw new UsageError(`--layers ${layers}: ${v.like} has ${full} decoder layers`);
  }
  const seed = intFlag(v.seed, "--seed", 0, 0);
  const maxShardBytes = v["max-shard-size"] === undefined
    ? undefined
    : sizeFlag(v["max-shard-size"], "--max-shard-size");
  try {
    await Deno.stat(v.out);
    throw new UsageError(`${v.out}: output folder already exists (choose another --out)`);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  const config = synthesizedConfig(v.like, layers, seed);
  const t0 = performance.now();
  let bar: Progress | null = null;
  const bytes = await synthesizeCheckpoint(config, v.out, {
    seed,
    maxShardBytes,
    tokenizerDir: DEFAULT_MODEL,
    progress: v.quiet
      ? undefined
      : (done, total) => (bar ??= new Progress("synthesize", total, "bytes")).update(done),
  });
  const seconds = (performance.now() - t0) / 1000;
  console.log(
    `wrote ${v.out}: ${v.like}, ${config.num_hidden_layers} of ${full} layers, ` +
      `${(bytes / 1e9).toFixed(2)} GB of bf16 weights in ${seconds.toFixed(1)} s`,
  );
});
