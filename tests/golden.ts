// Shared by the parity tests: run a model folder's golden batch through a backend and
// compare with the reference outputs in golden.safetensors.

import assert from "node:assert";
import type { Backend } from "../lib/backend/backend.ts";
import { SafetensorsFile, toFloat32, toInt32 } from "../lib/io/safetensors.ts";
import { forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import { topKIndices } from "../lib/backend/cpu.ts";

export const FIXTURE_ROOT = new URL("./fixtures/hf-golden/", import.meta.url).pathname;
export const DEFAULT_MODEL = new URL("../data/models/tiny-deepseek-moe/", import.meta.url).pathname;

export const FIXTURES = [...Deno.readDirSync(FIXTURE_ROOT)]
  .filter((e) => e.isDirectory)
  .map((e) => e.name)
  .sort();

export interface ParityReport {
  relLogitError: number;
  maxHiddenError: number;
  maxRouterError: number;
}

/**
 * Logits within `tol` relative to the largest |logit|, every hidden state within
 * `tol * 10` absolute (hidden states are O(1)..O(10)), router logits close, and the same
 * top-k expert set for every token and MoE layer.
 */
export async function checkGolden(
  dir: string,
  backend: Backend,
  tol = 1e-4,
): Promise<ParityReport> {
  const golden = await SafetensorsFile.open(`${dir}/golden.safetensors`);
  const model = await Model.load(dir, backend);
  try {
    const idsRaw = await golden.read("input_ids");
    const [batch, seqLen] = idsRaw.shape;
    const r = await forward(model, toInt32(idsRaw), { batch, seqLen }, {
      collectHidden: true,
      collectRouter: true,
    });
    const want = toFloat32(await golden.read("logits"));
    let maxAbs = 0, maxDiff = 0;
    for (let i = 0; i < want.length; i++) {
      maxAbs = Math.max(maxAbs, Math.abs(want[i]));
      maxDiff = Math.max(maxDiff, Math.abs(want[i] - r.logits[i]));
    }
    const relLogitError = maxDiff / maxAbs;
    assert(
      relLogitError <= tol,
      `${dir}: logits differ by ${relLogitError} of the largest logit (tol ${tol})`,
    );

    let maxHiddenError = 0;
    for (let i = 0; i <= model.spec.numLayers; i++) {
      const h = toFloat32(await golden.read(`hidden_states_${i}`));
      for (let j = 0; j < h.length; j++) {
        maxHiddenError = Math.max(maxHiddenError, Math.abs(h[j] - r.hiddenStates![i][j]));
      }
    }
    assert(maxHiddenError <= tol * 10, `${dir}: hidden states differ by ${maxHiddenError}`);

    let maxRouterError = 0;
    const moe = model.spec.layers.filter((l) => l.mlp.kind === "moe");
    assert.equal(r.routing!.size, moe.length);
    for (const layer of moe) {
      const l = layer.index, k = (layer.mlp as { topK: number }).topK;
      const want = toFloat32(await golden.read(`router_logits_${l}`));
      const got = r.routerLogits!.get(l)!;
      const e = want.length / (batch * seqLen);
      for (let j = 0; j < want.length; j++) {
        maxRouterError = Math.max(maxRouterError, Math.abs(want[j] - got[j]));
      }
      const idx = r.routing!.get(l)!.indices;
      for (let t = 0; t < batch * seqLen; t++) {
        const expected = new Set(topKIndices(want.subarray(t * e, (t + 1) * e), k));
        const chosen = new Set(idx.subarray(t * k, (t + 1) * k));
        assert.deepEqual(
          chosen,
          expected,
          `${dir}: layer ${l} token ${t} chose experts [${[...chosen]}], reference [${[
            ...expected,
          ]}]`,
        );
      }
    }
    assert(maxRouterError <= tol * 10, `${dir}: router logits differ by ${maxRouterError}`);
    return { relLogitError, maxHiddenError, maxRouterError };
  } finally {
    golden.close();
    model.close();
  }
}
