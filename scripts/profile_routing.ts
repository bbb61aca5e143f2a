// Routing profile of an MoE model on calibration text (CD-MoE step 1): per MoE layer and
// routed expert the selection count and the sum/mean routing weight, plus per-layer
// entropy, load imbalance and most frequent co-selected pairs, and the expert saliency
// that `deno task prune` ranks experts by. Writes results/profile/.

import { createBackend, parseCli, runMain } from "../lib/cli.ts";
import { hashModelFolder, resultsHeader, resultsPath, writeJsonAtomic } from "../lib/io/results.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { moeLayers } from "../lib/model/config.ts";
import { Model } from "../lib/model/model.ts";
import { loadCalibration } from "../lib/methods/calibration.ts";
import {
  CALIBRATION_OPTIONS,
  calibrationFlags,
  calibrationHelp,
  lengthFlag,
  Progress,
  UsageError,
} from "../lib/methods/cli.ts";
import { calibrationPass } from "../lib/methods/layer_cache.ts";
import {
  formatProfile,
  PROFILE_KIND,
  PROFILE_SCHEMA,
  RoutingProfiler,
} from "../lib/methods/routing_profile.ts";
import { SaliencyRecorder } from "../lib/methods/expert_saliency.ts";

const HELP = `Usage: deno run -A scripts/profile_routing.ts [options]

Routing profile of an MoE checkpoint on calibration text (CD-MoE, methods.md 1a).

Options:
${
  calibrationHelp(`\
  --max-len N          tokens per document, BOS included, or "full" (default full: whole
                       documents up to the model's max_position_embeddings, as the reference)`)
}
  --layerwise          release each layer's weights after use (models larger than memory)
  --out FILE           results file (default results/profile/<date>-<name>.json)
  --name NAME          name in the default results path (default: the model folder name)
  --results DIR        results root for the default path (default results)
  --quiet              no progress lines
  --backend B          cpu, cpu-reference or webgpu (default cpu)
  -h, --help           this help
`;

await runMain(async () => {
  const values = parseCli(HELP, { ...CALIBRATION_OPTIONS, out: { type: "string" } });
  const { model: modelDir, data: dataPath, docs, batchSize, bos } = calibrationFlags(values);
  const requestedLen = lengthFlag(values["max-len"], "--max-len", null);

  const t0 = performance.now();
  const model = await Model.load(modelDir, await createBackend(values.backend));
  if (moeLayers(model.spec).length === 0) {
    throw new UsageError(`${modelDir}/config.json: the model has no MoE layers to profile`);
  }
  const maxLen = requestedLen ?? model.spec.maxPositions;
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
    ...await resultsHeader(PROFILE_KIND, PROFILE_SCHEMA),
    model: { path: modelDir, hash: await hashModelFolder(modelDir) },
    data: {
      path: dataPath,
      sha256: calib.sha256,
      docs: calib.docs,
      tokens: calib.tokens,
      bos: calib.bos,
    },
    settings: {
      docs,
      max_len: maxLen,
      full_length: requestedLen === null,
      batch_size: batchSize,
      bos,
      layerwise: !!values.layerwise,
    },
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
