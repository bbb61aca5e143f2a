// The webgpu backward matmul kernels (part of the matmul section) at training shapes.

import { CpuBackend } from "../backend/cpu.ts";
import { MATMUL_BACKWARD_KERNELS, type WebGpuBackend } from "../backend/webgpu/mod.ts";
import { maxRelError, roundRobinGpu, weightOf } from "./common.ts";

// The backward ladder's shapes [n, k, m]: one expert's share of the default model's 1 x 128
// training step (32 of 128 tokens x 4 of 16 experts; hidden 256, expert width 128, the
// gate/up projection) and the forward ladder's prefill shape.
const BACKWARD_SHAPES = { "expert-default-model": [32, 256, 128], prefill: [128, 512, 1024] };

/**
 * The backward matmul kernels (input and weight gradient of x @ w^T) at the training
 * shapes, in interleaved rounds like the forward ladder, each checked against the CPU
 * reference loops: the input gradient for an f32 (trainable) and a bf16 (frozen) weight,
 * the weight gradient (f32 whatever the weight).
 */
export async function benchMatmulBackward(gpu: WebGpuBackend, repeats: number) {
  const rows: Record<string, unknown>[] = [];
  const cpu = new CpuBackend({ reference: true }); // f64 sums: the errors are accuracy
  for (const [shape, [n, k, m]] of Object.entries(BACKWARD_SHAPES)) {
    const xData = new Float32Array(n * k).map((_, i) => Math.sin(i * 0.37));
    const dyData = new Float32Array(n * m).map((_, i) => Math.cos(i * 0.11));
    const x = gpu.tensor(xData, [n, k]), dy = gpu.tensor(dyData, [n, m]);
    const cx = cpu.tensor(xData, [n, k]), cdy = cpu.tensor(dyData, [n, m]);
    for (const [gradient, dtype] of [["input", "F32"], ["input", "BF16"], ["weight", "F32"]]) {
      const raw = weightOf(dtype as "F32" | "BF16", m, k);
      const w = gpu.uploadWeight(raw), cw = cpu.uploadWeight(raw);
      const wantGrad = cpu.tensor(new Float32Array(m * k), [m, k]);
      const cdx = cpu.matmulBackward(cx, cw, cdy, {
        needInput: gradient === "input",
        weightGrad: gradient === "weight" ? wantGrad : undefined,
      });
      const want = await cpu.read(cdx ?? wantGrad);
      const call = async (be: WebGpuBackend) => {
        if (gradient === "input") {
          const dx = be.matmulBackward(x, w, dy, { needInput: true })!;
          const got = await be.read(dx);
          be.free(dx);
          return got;
        }
        const wg = be.tensor(new Float32Array(m * k), [m, k]);
        be.matmulBackward(x, w, dy, { needInput: false, weightGrad: wg });
        const got = await be.read(wg);
        be.free(wg);
        return got;
      };
      const backends = MATMUL_BACKWARD_KERNELS.map((kernel) =>
        gpu.withOptions({ matmulBackwardKernel: kernel })
      );
      const errors = [];
      for (const be of backends) errors.push(maxRelError([await call(be)], [want]));
      const times = await roundRobinGpu(gpu, backends, repeats, call);
      gpu.freeWeight(w);
      const line: string[] = [];
      for (const [i, kernel] of MATMUL_BACKWARD_KERNELS.entries()) {
        const seconds = times.wall[i], deviceSeconds = times.device[i];
        const [gflops, deviceGflops] = [seconds, deviceSeconds].map((t) => 2 * n * k * m / t / 1e9);
        const maxRelError = errors[i], deviceTimer = times.timer;
        rows.push({
          shape,
          kernel,
          gradient,
          dtype,
          n,
          k,
          m,
          seconds,
          gflops,
          deviceSeconds,
          deviceTimer,
          deviceGflops,
          maxRelError,
        });
        line.push(
          `${kernel} ${gflops.toFixed(2)} GFLOP/s (${deviceTimer} ${deviceGflops.toFixed(2)}; ` +
            `error ${maxRelError.toExponential(1)})`,
        );
      }
      console.error(
        `matmul backward ${shape} ${gradient} ${dtype} ${n}x${k}x${m}: ${line.join(", ")}`,
      );
    }
    gpu.free(x), gpu.free(dy);
  }
  return { device: gpu.description, shapes: BACKWARD_SHAPES, rows };
}
