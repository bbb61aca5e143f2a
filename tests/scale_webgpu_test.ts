// The expert search on WebGPU with its expert outputs in a budgeted activation store
// (read back, spilled, uploaded for each candidate) scores exactly as with the outputs
// kept on the device.

import assert from "node:assert";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { ActivationStore } from "../lib/methods/activations.ts";
import { DEFAULT_CALIBRATION, loadCalibration } from "../lib/methods/calibration.ts";
import { expertSearchFast } from "../lib/methods/expert_search.ts";
import { calibrationPass } from "../lib/methods/layer_cache.ts";
import { RoutingProfiler } from "../lib/methods/routing_profile.ts";
import { moeLayers } from "../lib/model/config.ts";
import { Model } from "../lib/model/model.ts";
import { DEFAULT_MODEL } from "./golden.ts";
import { webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();

Deno.test({
  name: "webgpu expert search: spilled and uploaded outputs score as outputs kept on the device",
  ignore: gpu === null,
  async fn() {
    const model = await Model.load(DEFAULT_MODEL, gpu!);
    const tok = await loadTokenizer(DEFAULT_MODEL);
    const { batches } = await loadCalibration(DEFAULT_CALIBRATION, tok, {
      docs: 2,
      maxLen: 16,
      bos: "auto",
      bosTokenId: model.spec.bosTokenId,
      batchSize: 2,
    });
    const l = moeLayers(model.spec)[1];
    const run = async (store: ActivationStore) => {
      const profiler = new RoutingProfiler();
      const cache = await calibrationPass(model, batches, profiler, { store, layerwise: true });
      const avgW = profiler.result().layers[l].avg_w;
      const r = await expertSearchFast(model, cache, l, {
        k: 2,
        metric: "js-hidden",
        avgW,
        layerwise: true,
      });
      return { stats: { ...store.stats }, result: { ...r, seconds: 0, outputSeconds: 0 } };
    };
    const kept = await run(new ActivationStore());
    const spilledStore = new ActivationStore(0);
    const spilled = await run(spilledStore);
    spilledStore.close();
    assert.deepStrictEqual(spilled.result, kept.result);
    assert(spilled.stats.spilledBytes > 0 && spilled.stats.peakMemoryBytes === 0);
    model.close();
  },
});
