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

/** The wgpu backends tried unless DENO_WEBGPU_BACKEND says otherwise: not OpenGL. */
export const NATIVE_WEBGPU_BACKENDS = "vulkan,metal,dx12";

export async function createWebGpuBackend(opts: WebGpuOptions = {}): Promise<WebGpuBackend> {
  const gpu = (navigator as { gpu?: GPU }).gpu;
  if (!gpu) {
    throw new NoWebGpuAdapterError(
      "navigator.gpu is missing: run with `deno run --unstable-webgpu` " +
        "(or `deno test --unstable-webgpu`)",
    );
  }
  // Left to itself wgpu also offers OpenGL adapters, and on a machine without a Vulkan
  // driver that is Mesa's software GL, where one test ran 11 minutes and the suite would take
  // hours. So unless DENO_WEBGPU_BACKEND names backends (gl included, if wanted), only the
  // native ones are tried; Deno reads the variable at the process's first adapter request.
  const backends = Deno.env.get("DENO_WEBGPU_BACKEND");
  if (backends === undefined) Deno.env.set("DENO_WEBGPU_BACKEND", NATIVE_WEBGPU_BACKENDS);
  const adapter = await gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    throw new NoWebGpuAdapterError(
      `no WebGPU adapter found on ${backends ?? NATIVE_WEBGPU_BACKENDS} (DENO_WEBGPU_BACKEND): ` +
        "no usable GPU driver. On Linux without a GPU, Mesa's software Vulkan driver provides " +
        "one: apt-get install mesa-vulkan-drivers libvulkan1. OpenGL adapters are used only " +
        "when DENO_WEBGPU_BACKEND names gl (Mesa's software GL is hundreds of times slower)",
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
