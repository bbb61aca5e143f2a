// The decode section: greedy decoding with the KV cache, tokens/s, device submits per token
// and GPU time per kernel per token (timestamp queries, where the adapter has them).

import { argmaxRow, type Backend, type Tensor } from "../backend/backend.ts";
import { type KernelTime, WebGpuBackend } from "../backend/webgpu/mod.ts";
import { enableOnModel } from "../methods/compressed_experts.ts";
import type { KvCache } from "../model/decoder.ts";
import {
  cachedLogits,
  createKvCache,
  forwardCached,
  freeKvCache,
  greedyDecode,
} from "../model/generate.ts";
import { Model } from "../model/model.ts";
import type { BenchSection } from "./common.ts";

/**
 * Greedy decoding with the KV cache, one token per step after a prompt, as generation runs
 * it (greedyDecode): tokens/s, and on WebGPU per step the submits (each a wait on the
 * device), the dispatches and the host time encoding them (what bounds decoding once the GPU
 * is fast) and, where the adapter has timestamp queries, the GPU time per kernel of as many
 * more steps. On WebGPU the same steps also run reading each step's logits for a host
 * argmax (what greedyDecode replaced), the two loops interleaved. Then the model with
 * compressed experts (half of each token's top-k run, the rest scaled; ces of ones).
 */
async function benchDecode(backends: Map<string, Backend>, modelDir: string) {
  const rows: Record<string, unknown>[] = [];
  const prompt = 32, steps = 32, warmup = 4, rounds = 3;
  for (const [name, be] of backends) {
    for (const compressed of [false, true]) {
      const loops = be instanceof WebGpuBackend && !compressed ? [false, true] : [false];
      rows.push(...await decodeRows(name, be, compressed, loops));
    }
  }
  return rows;

  async function decodeRows(name: string, be: Backend, compressed: boolean, loops: boolean[]) {
    const model = await Model.load(modelDir, be);
    const moe = model.spec.layers.find((l) => l.mlp.kind === "moe")?.mlp;
    const mainExperts = compressed && moe?.kind === "moe" ? Math.max(1, moe.topK >> 1) : null;
    if (compressed && !mainExperts) return (model.close(), []); // a dense model: no such variant
    if (mainExperts) enableOnModel(model, mainExperts, "bench");
    const gpu = be instanceof WebGpuBackend ? be : null;
    const ids = new Int32Array(prompt).map((_, i) => (i * 7919 + 13) % 256);
    // Per loop (hostArgmax: read the logits each step): its cache, prefilled, and totals.
    interface Run {
      hostArgmax: boolean;
      cache: KvCache;
      seconds: number;
      submits: number;
      dispatches: number;
      encodeMs: number;
    }
    const runs: Run[] = [];
    for (const hostArgmax of loops) {
      const cache = createKvCache(model, 1, prompt + warmup + (rounds + 1) * (steps + 1) + 1);
      be.free(await cachedLogits(model, ids, prompt, cache, true));
      runs.push({ hostArgmax, cache, seconds: 0, submits: 0, dispatches: 0, encodeMs: 0 });
    }
    // Each run starts from one more token's logits, recorded and read outside the timing.
    const start = async (cache: KvCache) => {
      const logits = await cachedLogits(model, Int32Array.of(1), 1, cache, true);
      await be.read(logits);
      return logits;
    };
    const decodeSteps = async (run: Run, logits: Tensor, count = steps) => {
      if (!run.hostArgmax) {
        return await greedyDecode(model, run.cache, logits, count + 1, () => false);
      }
      let host: Float32Array = (await be.read(logits)).slice();
      be.free(logits);
      for (let i = 0; i < count; i++) {
        const next = Int32Array.of(argmaxRow(host, 0, host.length));
        host = await forwardCached(model, next, 1, run.cache);
      }
    };
    // the first run compiles the one-row kernels the prompt did not use
    for (const run of runs) await decodeSteps(run, await start(run.cache), warmup);
    for (let r = 0; r < rounds; r++) {
      for (const run of runs) {
        const logits = await start(run.cache);
        const counters = gpu ? [gpu.submits, gpu.dispatches, gpu.encodeMilliseconds] : [0, 0, 0];
        const t0 = performance.now();
        await decodeSteps(run, logits);
        run.seconds += (performance.now() - t0) / 1000;
        if (gpu) {
          run.submits += gpu.submits - counters[0], run.dispatches += gpu.dispatches - counters[1];
          run.encodeMs += gpu.encodeMilliseconds - counters[2];
        }
      }
    }
    const out = [];
    for (const run of runs) {
      let kernels = null;
      if (gpu && !run.hostArgmax && gpu.device.features.has("timestamp-query")) {
        const logits = await start(run.cache);
        kernels = kernelProfile(await gpu.timeKernels(() => decodeSteps(run, logits)), steps);
      }
      freeKvCache(model, run.cache);
      const tokens = rounds * steps;
      const row = {
        backend: name,
        device: be.description,
        variant: (mainExperts ? `compressed experts k_m=${mainExperts}` : "plain") +
          (run.hostArgmax ? ", logits read each step" : ""),
        prompt,
        steps: tokens,
        seconds: run.seconds,
        tokensPerSecond: tokens / run.seconds,
        submitsPerToken: gpu && run.submits / tokens,
        dispatchesPerToken: gpu && run.dispatches / tokens,
        encodeMsPerToken: gpu && run.encodeMs / tokens,
        kernels,
      };
      console.error(
        `decode ${name} ${row.variant}: ${row.tokensPerSecond.toFixed(1)} tok/s` +
          (gpu
            ? `, per token ${row.submitsPerToken} submits, ${row.dispatchesPerToken} dispatches, ` +
              `${row.encodeMsPerToken!.toFixed(2)} ms host encoding`
            : ""),
      );
      for (const k of kernels?.slice(0, 6) ?? []) {
        console.error(`  ${k.milliseconds.toFixed(3)} ms/token in ${k.dispatches} x ${k.kernel}`);
      }
      out.push(row);
    }
    model.close();
    return out;
  }
}

/** timeKernels' totals per decoded token, slowest kernel first. */
function kernelProfile(times: Map<string, KernelTime>, steps: number) {
  return [...times].map(([kernel, t]) => ({
    kernel,
    dispatches: t.dispatches / steps,
    milliseconds: t.milliseconds / steps,
  })).sort((a, b) => b.milliseconds - a.milliseconds);
}

export const decodeSection: BenchSection = {
  name: "decode",
  async run({ backends, modelDir }) {
    return { decode: await benchDecode(backends, modelDir) };
  },
};
