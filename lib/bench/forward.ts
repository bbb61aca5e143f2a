// The forward section: default-model forward tokens/s and GFLOP/s per backend (the CPU's
// also as a fraction of the machine's matmul peak, where the matmul section measured it).

import type { Backend } from "../backend/backend.ts";
import { CpuBackend } from "../backend/cpu.ts";
import { coreThreads, defaultThreads } from "../backend/cpu_rows.ts";
import { countParams } from "../eval/measure.ts";
import { forward } from "../model/decoder.ts";
import { Model } from "../model/model.ts";
import { visiblePairs } from "./attention.ts";
import { type BenchSection, roundRobin } from "./common.ts";

/**
 * FLOPs of a forward over batch x seqLen tokens: 2 per multiply-add of every matmul a token
 * runs (countParams' active_compute: projections, shared and routed-to experts, router,
 * lm_head; its norm weights are noise) and of q.k and p.v over the visible keys.
 */
function forwardFlops(model: Model, batch: number, seqLen: number): number {
  const s = model.spec;
  let flops = 2 * countParams(model).active_compute * batch * seqLen;
  for (const { attention, window } of s.layers) {
    if (!attention) continue;
    const { heads, kvHeads, headDim } = s;
    const shape = { batch, qLen: seqLen, kvLen: seqLen, heads, kvHeads, headDim, window };
    flops += 4 * headDim * heads * visiblePairs(shape);
  }
  return flops;
}

async function benchForward(backends: Map<string, Backend>, modelDir: string, repeats: number) {
  const rows: Record<string, unknown>[] = [];
  for (const [name, be] of backends) {
    // The reference shape is 16 x 256; the plain loops and the software GPU get fewer rows.
    const batch = name === "cpu" ? 16 : 2, seqLen = 256;
    const ids = new Int32Array(batch * seqLen).map((_, i) => (i * 7919 + 13) % 256);
    // The CPU backend also runs with the other thread count (one, or one a core where the
    // default is one), interleaved with its default: what the worker threads of the
    // elementwise passes bring, measured side by side.
    const variants: [string, Backend][] = [[name, be]];
    const other = defaultThreads() > 1 ? 1 : coreThreads();
    if (name === "cpu" && other !== defaultThreads()) {
      variants.push([
        `cpu-${other}-thread${other > 1 ? "s" : ""}`,
        new CpuBackend({ threads: other }),
      ]);
    }
    const models = await Promise.all(variants.map(([, b]) => Model.load(modelDir, b)));
    const run = (model: Model) => forward(model, ids, { batch, seqLen });
    for (const model of models) await run(model); // warm-up (JIT, page faults, workers)
    const times = await roundRobin(models, name === "cpu" ? repeats : 1, run);
    const flops = forwardFlops(models[0], batch, seqLen);
    variants.forEach(([label, b], i) => {
      const gflops = flops / times[i] / 1e9;
      rows.push({
        backend: label,
        device: b.description,
        batch,
        seqLen,
        seconds: times[i],
        tokensPerSecond: (batch * seqLen) / times[i],
        gflops,
      });
      console.error(
        `forward ${label} ${batch}x${seqLen}: ${(batch * seqLen / times[i]).toFixed(0)} tok/s, ` +
          `${gflops.toFixed(1)} GFLOP/s`,
      );
    });
    models.forEach((model) => model.close());
  }
  return rows;
}

export const forwardSection: BenchSection = {
  name: "forward",
  async run({ backends, modelDir, repeats, result }) {
    const rows = await benchForward(backends, modelDir, repeats);
    // The CPU rows as a fraction of the machine's matmul peak, where this run measured it.
    const peak = (result.matmul as Record<string, unknown>[] | undefined)
      ?.find((r) => String(r.backend).startsWith("blas"))?.gflops as number | undefined;
    for (const row of rows) {
      if (peak && String(row.backend).startsWith("cpu")) {
        row.fractionOfPeak = (row.gflops as number) / peak;
      }
    }
    return { forward: rows };
  },
};
