// The searches' JS divergence on the device (kernels/divergence.wgsl) against the textbook
// formula in f64, on rows near the original (where the host form cancels), far from it,
// peaked (softmax entries below eps) and at odd widths; and the expert search scored on
// the device against the naive search, whose rows come back and are scored in f64.

import assert from "node:assert";
import { hasDeviceDivergence } from "../lib/backend/backend.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { DEFAULT_CALIBRATION, loadCalibration } from "../lib/methods/calibration.ts";
import { JS_EPS, Reference } from "../lib/methods/divergence.ts";
import { expertSearchFast, expertSearchNaive } from "../lib/methods/expert_search.ts";
import { calibrationPass } from "../lib/methods/layer_cache.ts";
import { RoutingProfiler } from "../lib/methods/routing_profile.ts";
import { moeLayers } from "../lib/model/config.ts";
import { Model } from "../lib/model/model.ts";
import { mulberry32 } from "../lib/random.ts";
import { DEFAULT_MODEL } from "./golden.ts";
import { webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;

function softmaxPlusEps(row: Float32Array): Float64Array {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v);
  const e = Float64Array.from(row, (x) => Math.exp(x - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum + JS_EPS);
}

/** 0.5 (sum p ln p + sum q ln q) - sum m ln m in f64, P rounded to f32 as stored. */
function jsTextbook(a: Float32Array, b: Float32Array): number {
  const p = softmaxPlusEps(a).map(Math.fround), q = softmaxPlusEps(b);
  let js = 0;
  for (let i = 0; i < p.length; i++) {
    const m = 0.5 * (p[i] + q[i]);
    js += 0.5 * (p[i] * Math.log(p[i]) + q[i] * Math.log(q[i])) - m * Math.log(m);
  }
  return js;
}

Deno.test({
  name: "webgpu jsDivergenceRows matches the f64 formula, near and far rows, odd widths",
  ignore,
  async fn() {
    assert(hasDeviceDivergence(gpu!));
    const random = mulberry32(5);
    let worst = 0;
    // [width, spread of the logits, size of the candidate's change relative to it]
    const cases = [[256, 4, 1e-3], [256, 4, 0.3], [2048, 8, 1e-2], [257, 40, 0.3], [33, 900, 0.1]];
    cases.push([5, 1, 1e-2], [64, 4, 0]);
    for (const [dim, spread, change] of cases) {
      const rows = 70; // past one reduction's 64 threads a row: rows, not threads
      const orig = Float32Array.from({ length: rows * dim }, () => (random() - 0.5) * spread);
      const cand = orig.map((v) => v + (random() - 0.5) * spread * change);
      const ref = new Reference("js-hidden", dim);
      ref.add(orig, { batch: 1, seqLen: rows });
      const p = gpu!.tensor(ref.probs(0), [rows, dim]); // shared memory: copied on upload
      const c = gpu!.tensor(cand, [rows, dim]);
      const out = gpu!.jsDivergenceRows(p, c, JS_EPS);
      const got = await gpu!.read(out);
      for (let r = 0; r < rows; r++) {
        const o = r * dim;
        const want = jsTextbook(orig.subarray(o, o + dim), cand.subarray(o, o + dim));
        // q's f32 rounding (delta ~1e-7 relative) reaches JS = sum s g(d) / 4 ~ sum s d^2 / 4
        // through d = (p - q) / s, as about sqrt(2 JS) delta: 2e-6 of JS at 1e-2, 2e-5 at
        // 1e-4 (the searches' divergences are 1e-4 and up); plus the f64 formula's own
        // cancellation, ~1e-16 (it gives -1e-16 for the peaked rows).
        const err = Math.abs(got[r] - want);
        if (want >= 1e-4) worst = Math.max(worst, err / want);
        if (change === 0) assert(got[r] < 1e-12, `JS(P||P) = ${got[r]}`);
        else {
          assert(
            err <= 1e-6 * want + 2e-7 * Math.sqrt(Math.max(want, 0)) + 1e-15,
            `dim ${dim} spread ${spread} change ${change}: ${got[r]} vs ${want}`,
          );
        }
      }
      gpu!.free(p), gpu!.free(c), gpu!.free(out);
    }
    console.log(`  worst relative error where JS >= 1e-4: ${worst.toExponential(2)}`);
  },
});

Deno.test({
  name: "webgpu expert search scored on the device agrees with the naive search (f64 rows)",
  ignore,
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
    const profiler = new RoutingProfiler();
    const cache = await calibrationPass(model, batches, profiler);
    // A middle layer, and the last (compared after the final norm; one step, for time).
    const moe = moeLayers(model.spec);
    for (const [l, k] of [[moe[1], 2], [moe.at(-1)!, 1]]) {
      const opts = { k, metric: "js-hidden" as const, avgW: profiler.result().layers[l].avg_w };
      const fast = await expertSearchFast(model, cache, l, opts);
      const naive = await expertSearchNaive(model, batches, l, opts);
      assert.deepStrictEqual(fast.order, naive.order);
      for (const [i, step] of fast.steps.entries()) {
        for (const [c, d] of Object.entries(step.candidates)) {
          const want = naive.steps[i].candidates[c];
          assert(
            Math.abs(d - want) <= 1e-4 * want,
            `layer ${l} step ${i} expert ${c}: ${d} vs ${want}`,
          );
        }
      }
    }
    model.close();
  },
});
