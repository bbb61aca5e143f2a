// Opening the device: the adapter, its features and limits, and the kernels' sources.

import { WebGpuBackend } from "./backend.ts";
import { loadKernelSources } from "./kernels.ts";
import type { WebGpuOptions } from "./options.ts";

/** Thrown when WebGPU is unavailable or no adapter is found (tests may skip on it outside CI). */
export class NoWebGpuAdapterError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NoWebGpuAdapterError";
  }
}

export async function createWebGpuBackend(opts: WebGpuOptions = {}): Promise<WebGpuBackend> {
  const gpu = (navigator as { gpu?: GPU }).gpu;
  if (!gpu) {
    throw new NoWebGpuAdapterError(
      "navigator.gpu is missing: run with `deno run --unstable-webgpu` " +
        "(or `deno test --unstable-webgpu`)",
    );
  }
  const adapter = await gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    throw new NoWebGpuAdapterError(
      "no WebGPU adapter found: no usable GPU driver " +
        "(on Linux without a GPU, Mesa's llvmpipe Vulkan driver provides one)",
    );
  }
  // timestamp-query only serves timeKernels (the bench's per-kernel profile); asking for
  // it costs nothing until a query set is used.
  const requiredFeatures = (["shader-f16", "timestamp-query"] as GPUFeatureName[])
    .filter((f) => adapter.features.has(f));
  const device = await adapter.requestDevice({
    requiredFeatures,
    requiredLimits: {
      maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
      maxBufferSize: adapter.limits.maxBufferSize,
    },
  });
  await loadKernelSources();
  const info = adapter.info;
  const description = [info.description, info.vendor && `vendor ${info.vendor}`, info.architecture]
    .filter((s) => s).join(", ") || "unknown WebGPU adapter";
  return new WebGpuBackend(device, description, opts);
}
