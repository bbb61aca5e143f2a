// The device's roofline (part of the matmul section): memory bandwidth and f32 FMA peak.

import type { WebGpuBackend } from "../backend/webgpu/mod.ts";
import { roundRobinGpu, timeIt } from "./common.ts";

/**
 * Runs `measure(size)` (its seconds) at doubling sizes from `size` until it takes at least
 * 10 ms, so that a GPU's launch costs do not count, or `size` reaches `most`.
 */
async function atLeast10ms(size: number, most: number, measure: (size: number) => Promise<number>) {
  for (;;) {
    const seconds = await measure(size);
    if (seconds >= 0.01 || size >= most) return { size, seconds };
    size *= 2;
  }
}

/**
 * What the device does at best, as WebGPU reports neither: memory bandwidth, as buffer
 * copies of up to 256 MiB move it (bytes read plus bytes written a second: a copy streams
 * both, where a kernel's loads may not, as on llvmpipe, whose lanes gather), and f32 FMA
 * throughput (kernels/roofline.wgsl: 8 vec4 chains a thread in registers). Each runs
 * longer until it takes at least 10 ms, so that a GPU's launch costs do not count.
 */
export async function benchRoofline(gpu: WebGpuBackend, repeats: number) {
  const device = gpu.device;
  gpu.flush();
  const bytes = Math.floor(Math.min(256 * 2 ** 20, device.limits.maxBufferSize) / 16) * 16;
  const usage = GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  const [a, b] = [0, 1].map(() => device.createBuffer({ size: bytes, usage }));
  const copy = async (count: number) => {
    const encoder = device.createCommandEncoder();
    for (let i = 0; i < count; i++) {
      encoder.copyBufferToBuffer(i % 2 ? b : a, 0, i % 2 ? a : b, 0, bytes);
    }
    device.queue.submit([encoder.finish()]);
    await device.queue.onSubmittedWorkDone();
  };
  await copy(2); // first touch of both buffers
  const copies = await atLeast10ms(1, 1024, (count) => timeIt(repeats, () => copy(count)));
  a.destroy(), b.destroy();
  const threads = 256 * 1024;
  const timer = gpu.device.features.has("timestamp-query") ? "gpu" : "wall";
  // (llvmpipe ends a loop past 65,535 iterations)
  const fma = await atLeast10ms(256, 32768, async (iterations) => {
    const times = await roundRobinGpu(gpu, [iterations], repeats, async (count) => {
      const out = gpu.fmaChains(threads, count);
      await gpu.read(out);
      gpu.free(out);
    });
    return times.device[0];
  });
  const copyGBps = (2 * copies.size * bytes) / copies.seconds / 1e9;
  const f32Gflops = (threads * fma.size * 64) / fma.seconds / 1e9;
  console.error(
    `roofline ${gpu.description}: memory ${copyGBps.toPrecision(3)} GB/s (${copies.size} x ${
      (bytes / 2 ** 20).toFixed(0)
    } MiB copied, read + written), f32 FMA ${f32Gflops.toPrecision(3)} GFLOP/s (${timer} time)`,
  );
  return {
    device: gpu.description,
    copyGBps,
    f32Gflops,
    copyBytes: copies.size * bytes,
    timer,
  };
}

export interface Roofline {
  copyGBps: number;
  f32Gflops: number;
}
