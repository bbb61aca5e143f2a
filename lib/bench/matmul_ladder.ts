// The webgpu matmul kernel ladder (part of the matmul section) as fractions of the roofline.

import { MATMUL_KERNELS, WebGpuBackend } from "../backend/webgpu/mod.ts";
import { roundRobinGpu, weightOf } from "./common.ts";
import type { Roofline } from "./roofline.ts";

// The ladder's shapes: prefill is many rows (compute bound), decode one row (bound by
// reading the weights). Small enough for llvmpipe: a naive prefill round takes seconds. A
// device that runs the small prefill in under LADDER_LARGE_UNDER seconds (a GPU, not a
// software adapter) also gets the large shapes, where a GPU's kernels can reach its peak.
const LADDER_SHAPES = { prefill: [128, 512, 1024], decode: [1, 2048, 2048] } as const;
const LADDER_LARGE_SHAPES = {
  "prefill-large": [2048, 2048, 2048],
  "decode-large": [1, 8192, 8192],
} as const;
const LADDER_LARGE_UNDER = 0.002;

/** The adapter behind the webgpu backend: what the ladder's numbers depend on. */
async function adapterReport() {
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) return null;
  const { vendor, architecture, device, description } = adapter.info;
  const l = adapter.limits;
  return {
    info: { vendor, architecture, device, description },
    features: {
      "shader-f16": adapter.features.has("shader-f16"),
      subgroups: adapter.features.has("subgroups"),
      "timestamp-query": adapter.features.has("timestamp-query"),
    },
    limits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: l.maxComputeWorkgroupSizeX,
    },
  };
}

/**
 * Every matmul kernel of the webgpu backend at the prefill and decode shapes, per dtype,
 * timed in interleaved rounds (roundRobin, wall time with the result read back), and where
 * the adapter has timestamp queries also by the kernels' GPU time; each as a fraction of
 * the roofline: prefill GFLOP/s of the f32 FMA peak, decode weight GB/s of the memory
 * bandwidth.
 */
export async function benchMatmulLadder(gpu: WebGpuBackend, repeats: number, roofline: Roofline) {
  const rows: Record<string, unknown>[] = [];
  for (const [shape, nkm] of Object.entries(LADDER_SHAPES)) {
    rows.push(...await ladderRows(gpu, repeats, roofline, shape, nkm));
  }
  const prefill = rows.find((r) => r.shape === "prefill" && r.kernel === "blocked")!;
  const large = (prefill.deviceSeconds as number) < LADDER_LARGE_UNDER;
  for (const [shape, nkm] of large ? Object.entries(LADDER_LARGE_SHAPES) : []) {
    rows.push(...await ladderRows(gpu, repeats, roofline, shape, nkm));
  }
  const shapes = large ? { ...LADDER_SHAPES, ...LADDER_LARGE_SHAPES } : LADDER_SHAPES;
  return { device: gpu.description, adapter: await adapterReport(), shapes, rows };
}

/** The ladder at one shape [n, k, m], for each weight dtype. */
async function ladderRows(
  gpu: WebGpuBackend,
  repeats: number,
  roofline: Roofline,
  shape: string,
  [n, k, m]: readonly number[],
) {
  const rows: Record<string, unknown>[] = [];
  for (const dtype of ["F32", "BF16", "F16"] as const) {
    const x = gpu.tensor(new Float32Array(n * k).fill(0.1), [n, k]);
    const w = gpu.uploadWeight(weightOf(dtype, m, k));
    const backends = MATMUL_KERNELS.map((kernel) => gpu.withOptions({ matmulKernel: kernel }));
    const call = async (be: WebGpuBackend) => {
      const y = be.matmul(x, w);
      await be.read(y);
      be.free(y);
    };
    for (const be of backends) await call(be); // warm-up: pipeline compilation
    const times = await roundRobinGpu(gpu, backends, repeats, call);
    gpu.free(x), gpu.freeWeight(w);
    const weightBytes = m * k * (dtype === "F32" ? 4 : 2), flops = 2 * n * k * m;
    const line: string[] = [];
    for (const [i, kernel] of MATMUL_KERNELS.entries()) {
      const seconds = times.wall[i], deviceSeconds = times.device[i];
      const gflops = flops / seconds / 1e9, weightGBps = weightBytes / seconds / 1e9;
      const deviceGflops = flops / deviceSeconds / 1e9;
      const deviceWeightGBps = weightBytes / deviceSeconds / 1e9;
      const decode = n === 1;
      const fraction = decode
        ? deviceWeightGBps / roofline.copyGBps
        : deviceGflops / roofline.f32Gflops;
      rows.push({
        shape,
        kernel,
        dtype,
        n,
        k,
        m,
        seconds,
        gflops,
        weightGBps,
        deviceSeconds,
        deviceTimer: times.timer,
        deviceGflops,
        deviceWeightGBps,
        ...(decode ? { fractionOfBandwidth: fraction } : { fractionOfF32Peak: fraction }),
      });
      line.push(
        `${kernel} ${gflops.toFixed(2)} GFLOP/s ${
          weightGBps.toPrecision(3)
        } GB/s (${times.timer} ` +
          `time: ${(100 * fraction).toFixed(1)}% of ${decode ? "memory bandwidth" : "f32 peak"})`,
      );
    }
    console.error(`matmul ladder ${shape} ${dtype} ${n}x${k}x${m}: ${line.join(", ")}`);
  }
  return rows;
}
