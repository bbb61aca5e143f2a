// What the bench's sections share: the section interface, interleaved timing (on the
// GPU also by timestamp queries), test weights in each dtype and the error measure.

import type { Backend } from "../backend/backend.ts";
import { f32ToBf16Bits, type RawTensor } from "../io/safetensors.ts";
import { median } from "../eval/measure.ts";
import type { WebGpuBackend } from "../backend/webgpu/mod.ts";

/** What every section gets: the backends, the settings and what earlier sections found. */
export interface BenchContext {
  backends: Map<string, Backend>;
  repeats: number;
  /** The model of the forward, decode and train sections. */
  modelDir: string;
  /** Where the layerwise section caches its generated checkpoint. */
  syntheticDir: string;
  /** The bench script, for sections that measure in a child process of their own. */
  script: string;
  /** The result so far (the forward reads the matmul section's BLAS peak). */
  result: Record<string, unknown>;
}

/** A section of scripts/bench.ts: its name for --only, and a run returning its result keys. */
export interface BenchSection {
  name: string;
  run(ctx: BenchContext): Promise<Record<string, unknown>>;
}

/**
 * Median seconds of `call` on each backend over `repeats` interleaved rounds (one call of
 * each, round-robin), so a slow spell on the machine hits them all alike.
 */
export async function roundRobin<B, T>(
  backends: B[],
  repeats: number,
  call: (be: B) => Promise<T>,
): Promise<number[]> {
  const times: number[][] = backends.map(() => []);
  for (let r = 0; r < repeats; r++) {
    for (const [i, be] of backends.entries()) {
      const t0 = performance.now();
      await call(be);
      times[i].push((performance.now() - t0) / 1000);
    }
  }
  return times.map(median);
}

export async function timeIt(repeats: number, fn: () => Promise<void>): Promise<number> {
  await fn(); // warm-up (pipeline compilation, page faults)
  const times: number[] = [];
  for (let i = 0; i < repeats; i++) {
    const t0 = performance.now();
    await fn();
    times.push((performance.now() - t0) / 1000);
  }
  return median(times);
}

/**
 * roundRobin on the GPU: per item the median wall time of `call` (which reads its result
 * back) and, where the adapter has timestamp queries, the median GPU time of its kernels
 * (a GPU's kernels can take microseconds, far below a submit and a read back), measured
 * in the same interleaved rounds; without timestamps `device` is the wall time.
 */
export async function roundRobinGpu<B>(
  gpu: WebGpuBackend,
  items: B[],
  repeats: number,
  call: (item: B) => Promise<unknown>,
): Promise<{ wall: number[]; device: number[]; timer: "gpu" | "wall" }> {
  if (!gpu.device.features.has("timestamp-query")) {
    const wall = await roundRobin(items, repeats, call);
    return { wall, device: wall, timer: "wall" };
  }
  const device: number[][] = items.map(() => []);
  const wall = await roundRobin([...items.keys()], repeats, async (i) => {
    const kernels = await gpu.timeKernels(async () => void await call(items[i]));
    let ms = 0;
    for (const k of kernels.values()) ms += k.milliseconds;
    device[i].push(ms / 1000);
  });
  return { wall, device: device.map(median), timer: "gpu" };
}

export function weightOf(dtype: "F32" | "BF16" | "F16", m: number, k: number): RawTensor {
  const f = new Float32Array(m * k).map((_, i) => Math.sin(i) * 0.05);
  if (dtype === "F32") return { name: "w", dtype, shape: [m, k], bytes: new Uint8Array(f.buffer) };
  if (dtype === "BF16") {
    return { name: "w", dtype, shape: [m, k], bytes: new Uint8Array(f32ToBf16Bits(f).buffer) };
  }
  // f16 bytes: scale into range and round via a DataView-free bit trick is overkill here;
  // small values widen exactly from bf16-like patterns, so encode through Math.fround.
  const h = new Uint16Array(f.length);
  for (let i = 0; i < f.length; i++) h[i] = toF16Bits(f[i]);
  return { name: "w", dtype, shape: [m, k], bytes: new Uint8Array(h.buffer) };
}

function toF16Bits(x: number): number {
  const sign = x < 0 ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a < 2 ** -24) return sign;
  if (a < 2 ** -14) return sign | Math.round(a / 2 ** -24);
  const e = Math.floor(Math.log2(a));
  const m = Math.round((a / 2 ** e - 1) * 1024);
  return sign | ((e + 15) << 10) | Math.min(m, 1023);
}

/** max |got - want| over max |want|, over all the pairs of arrays together. */
export function maxRelError(got: Float32Array[], want: Float32Array[]): number {
  let maxDiff = 0, maxAbs = 0;
  for (const [a, w] of want.entries()) {
    for (let i = 0; i < w.length; i++) {
      maxDiff = Math.max(maxDiff, Math.abs(got[a][i] - w[i]));
      maxAbs = Math.max(maxAbs, Math.abs(w[i]));
    }
  }
  return maxDiff / maxAbs;
}
