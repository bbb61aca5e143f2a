// Routing profile of an MoE model on calibration text (CD-MoE step 1): per MoE layer and
// routed expert the selection count and the sum/mean routing weight, plus per-layer
// entropy, load imbalance and most frequent co-selected pairs, and the expert saliency
// that `deno task prune` ranks experts by. Writes results/profile/.

import { createBackend, parseCli, runMain } from "../lib/cli.ts";
import { hashModelFolder, resultsHeader, resultsPath, writeJsonAtomic } from "../lib/io/results.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { moeLayers } from "../lib/model/config.ts";
import { Model } from "../lib/model/model.ts";
import {
  type BosMode,
  DEFAULT_BATCH_SIZE,
  DEFAULT_CALIBRATION,
  DEFAULT_DOCS,
  DEFAULT_MAX_LEN,
  loadCalibration,
} from "../lib/methods/calibration.ts";
import { choiceFlag, DEFAULT_MODEL, intFlag, Progress, UsageError } from "../lib/methods/cli.ts";
import { calibrationPass } from "../lib/methods/layer_cache.ts";
import { formatProfile, RoutingProfiler } from "../lib/methods/routing_profile.ts";
import { SaliencyRecorder } from "../lib/methods/expert_saliency.ts";

export const PROFILE_SCHEMA = 1;

const HELP = `Usage: deno run -A scripts/profile_routing.ts [options]

Routing profile of an MoE checkpoint on calibration text (CD-MoE, methods.md 1a).

Options:
  --model DIR        HF model folder (default ${DEFAULT_MODEL})
  --data FILE        JSON lines with a "text" field (default ${DEFAULT_CALIBRATION})
  --docs N           number of documents, from the start of the file (default ${DEFAULT_DOCS})
  --max-len N        tokens per document, BOS included (default ${DEFAULT_MAX_LEN})
  --batch-size N     documents per forward batch (default ${DEFAULT_BATCH_SIZE})
  --bos MODE         auto|yes|no: auto prepends the config's bos_token_id when it has one
                     (DeepSeek, Mixtral; the default model was trained on BOS-prefixed
                     documents) unless the tokenizer already adds it (default auto)
  --layerwise        release each layer's weights after use (models larger than memory)
  --out FILE         results file (default results/profile/<date>-<name>.json)
  --name NAME        name in the default results path (default: the model folder name)
  --results DIR      results root for the default path (default results)
  --quiet            no progress lines
  --backend B        cpu, cpu-reference or webgpu (default cpu)
  -h, --help         this help
`;

await runMain(async () => {
  const values = parseCli(HELP, {
    model: { type: "string" },
    data: { type: "string" },
    docs: { type: "string" },
    "max-len": { type: "string" },
    "batch-size": { type: "string" },
    bos: { type: "string" },
    layerwise: { type: "boolean" },
    out: { type: "string" },
    name: { type: "string" },
    results: { type: "string" },
    quiet: { type: "boolean" },
    backend: { type: "string" },
  });
  const modelDir = values.model ?? DEFAULT_MODEL;
  const dataPath = values.data ?? DEFAULT_CALIBRATION;
  const docs = intFlag(values.docs, "--docs", DEFAULT_DOCS);
  const maxLen = intFlag(values["max-len"], "--max-len", DEFAULT_MAX_LEN, 2);
  const batchSize = intFlag(values["batch-size"], "--batch-size", DEFAULT_BATCH_SIZE);
  const bos = choiceFlag<BosMode>(values.bos, "--bos", ["auto", "yes", "no"], "auto");

  const t0 = performance.now();
  const model = await Model.load(modelDir, await createBackend(values.backend));
  if (moeLayers(model.spec).length === 0) {
    throw new UsageError(`${modelDir}/config.json: the model has no MoE layers to profile`);
  }
  const tok = await loadTokenizer(modelDir);
  const calib = await loadCalibration(dataPath, tok, {
    docs,
    maxLen,
    bos,
    bosTokenId: model.spec.bosTokenId,
    batchSize,
  });
  const progress = new Progress("profile", model.spec.numLayers, "tokens");
  const profiler = new RoutingProfiler();
  const saliency = new SaliencyRecorder();
  await calibrationPass(model, calib.batches, profiler, {
    layerwise: values.layerwise,
    keepCache: false,
    onMoe: (l, xn, routing) => saliency.observe(model, l, xn, routing),
    progress: (done) =>
      !values.quiet && progress.update(done, (done * calib.tokens) / model.spec.numLayers),
  });
  const profile = profiler.result();
  const name = values.name ?? modelDir.replace(/\/+$/, "").split("/").pop()!;
  const out = values.out ?? resultsPath(values.results ?? "results", "profile", name);
  await writeJsonAtomic(out, {
    ...await resultsHeader("routing-profile", PROFILE_SCHEMA),
    model: { path: modelDir, hash: await hashModelFolder(modelDir) },
    data: {
      path: dataPath,
      sha256: calib.sha256,
      docs: calib.docs,
      tokens: calib.tokens,
      bos: calib.bos,
    },
    settings: { docs, max_len: maxLen, batch_size: batchSize, bos, layerwise: !!values.layerwise },
    routing_weight:
      "w_e as the model uses it: raw softmax probability, renormalised over the top-k only when the config normalises",
    profile,
    // Expert pruning's criteria (lib/methods/expert_saliency.ts, docs/expert-pruning.md).
    saliency: saliency.result(),
    wall_seconds: (performance.now() - t0) / 1000,
  });
  console.log(formatProfile(profile));
  console.log(`wrote ${out}`);
});
