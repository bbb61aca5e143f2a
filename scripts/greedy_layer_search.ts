// CD-MoE search (deno task search): routing profile -> greedy expert selection per MoE
// layer -> greedy layer search (CD-MoE-SR, CD-MoE-S, LayerDrop, BlockDrop). Logic lives
// in lib/methods/search_job.ts.

import { createBackend, parseCli, runMain } from "../lib/cli.ts";
import {
  CALIBRATION_OPTIONS,
  calibrationFlags,
  calibrationHelp,
  choiceFlag,
  intFlag,
  lengthFlag,
  sizeFlag,
  UsageError,
} from "../lib/methods/cli.ts";
import { DEFAULT_MAX_LEN } from "../lib/methods/calibration.ts";
import { METRICS, parseMetric } from "../lib/methods/divergence.ts";
import { type Variant, VARIANTS } from "../lib/methods/layer_search.ts";
import { DEFAULT_CACHE_MEMORY, runSearchJob } from "../lib/methods/search_job.ts";

const CACHE_GIB = DEFAULT_CACHE_MEMORY / 2 ** 30;

const HELP = `Usage: deno task search [options]
       deno run -A scripts/greedy_layer_search.ts [options]

CD-MoE (methods.md section 1): routing profile, greedy expert selection per MoE layer,
then greedy layer search, on calibration text. With no options: the shipped default
model and calibration data, all four variants. Progress on stderr; results in
results/search/<date>-<name>.json; a state file results/search/<name>.state.json is
written after every finished step, and a rerun with the same settings resumes from it.

Options:
${
  calibrationHelp(`\
  --max-len N          tokens per document in the searches, BOS included
                       (default ${DEFAULT_MAX_LEN})
  --profile-max-len N  tokens per document in the routing profile, or "full" (default full:
                       whole documents up to the model's max_position_embeddings, as the
                       reference profiles them)
  --profile FILE       routing profile from scripts/profile_routing.ts instead of profiling
                       (same model folder and --data file, else an error)`)
}
  --variant LIST       comma list of ${VARIANTS.join(", ")}, or "all" (default all)
                         sr        CD-MoE-SR: shared + first k greedy experts per layer
                         s         CD-MoE-S: shared experts only
                         layerdrop remove the MoE block, residual passes
                         blockdrop remove the whole decoder block
  --experts K          experts kept per condensed layer for sr (default: the model's top-k;
                       0 makes sr the same as s)
  --layers N           layer-search steps (default: all MoE layers)
  --metric M           layer-search divergence: ${METRICS.join(", ")} (default js-hidden)
                         js-hidden  JS over softmax of the final normed hidden state (reference)
                         cosine     1 - cosine of final normed hidden states
                         js-logits  JS over vocabulary distributions
                         kl-logits  KL(original || changed) over the vocabulary
                         loss       calibration cross-entropy of the changed model
  --expert-metric M    expert-selection divergence on decoder-layer outputs:
                       js-hidden or cosine (default js-hidden)
  --naive              reference procedure: a full forward per candidate (slow; for checks)
  --layerwise          release each layer's weights after use (models larger than memory),
                       and keep at most --cache-memory of cached activations in memory
  --cache-memory SIZE  cached activations (layer inputs, expert outputs) held in memory
                       before the rest is written to --spill-dir, e.g. 2GiB or 0 (default
                       ${CACHE_GIB}GiB with --layerwise, else no limit); results do not change
  --spill-dir DIR      where spilled activations go (default: the system temp folder)
  --name NAME          results/state name (default: model folder name, "-naive" appended)
  --results DIR        results root (default results)
  --fresh              ignore an existing state file and start over
  --quiet              no progress lines
  --backend B          cpu (BLAS when available), cpu-reference (plain loops), webgpu
                       (default cpu)
  -h, --help           this help
`;

await runMain(async () => {
  const values = parseCli(HELP, {
    ...CALIBRATION_OPTIONS,
    "profile-max-len": { type: "string" },
    profile: { type: "string" },
    variant: { type: "string" },
    experts: { type: "string" },
    layers: { type: "string" },
    metric: { type: "string" },
    "expert-metric": { type: "string" },
    naive: { type: "boolean" },
    fresh: { type: "boolean" },
    "cache-memory": { type: "string" },
    "spill-dir": { type: "string" },
  });
  const { model: modelFlag, data, docs, batchSize, bos } = calibrationFlags(values);
  const model = modelFlag.replace(/\/+$/, "");
  const variants = (values.variant ?? "all") === "all"
    ? [...VARIANTS]
    : (values.variant ?? "all").split(",").map((v) =>
      choiceFlag<Variant>(v.trim(), "--variant", VARIANTS, "sr")
    );
  if (new Set(variants).size !== variants.length) {
    throw new UsageError(`--variant: "${values.variant}" names a variant twice`);
  }
  const metric = (() => {
    try {
      return {
        layer: parseMetric(values.metric ?? "js-hidden", "--metric"),
        expert: parseMetric(values["expert-metric"] ?? "js-hidden", "--expert-metric"),
      };
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  })();
  const naive = !!values.naive;
  await runSearchJob({
    model,
    data,
    // (in this order: the state file's settings must match a resumed run's)
    name: values.name ?? model.split("/").pop()! + (naive ? "-naive" : ""),
    docs,
    maxLen: intFlag(values["max-len"], "--max-len", DEFAULT_MAX_LEN, 2),
    profileMaxLen: lengthFlag(values["profile-max-len"], "--profile-max-len", null),
    profile: values.profile ?? null,
    batchSize,
    bos,
    metric: metric.layer,
    expertMetric: metric.expert,
    experts: values.experts === undefined ? null : intFlag(values.experts, "--experts", 0, 0),
    layers: values.layers === undefined ? null : intFlag(values.layers, "--layers", 0, 1),
    variants,
    naive,
    layerwise: !!values.layerwise,
    cacheMemory: values["cache-memory"] === undefined
      ? undefined
      : values["cache-memory"].trim() === "0"
      ? 0
      : sizeFlag(values["cache-memory"], "--cache-memory"),
    spillDir: values["spill-dir"],
  }, {
    resultsRoot: values.results,
    backend: await createBackend(values.backend),
    fresh: values.fresh,
    progress: !values.quiet,
    log: (s) => console.log(s),
  });
});
