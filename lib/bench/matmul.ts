// The matmul section: GFLOP/s per backend and weight dtype (and the machine's BLAS peak); for
// webgpu also the device's roofline (memory bandwidth, f32 FMA peak), the kernel ladder
// (naive, tiled, blocked, gemv) at a prefill and a decode shape (and large ones on a fast
// device) as fractions of it, with the adapter's features and limits, and the backward kernels
// (tiled, blocked) at training shapes, checked against the CPU.

import type { Backend } from "../backend/backend.ts";
import { loadBlas } from "../backend/blas.ts";
import { WebGpuBackend } from "../backend/webgpu/mod.ts";
import { type BenchSection, timeIt, weightOf } from "./common.ts";
import { benchMatmulBackward } from "./matmul_backward.ts";
import { benchMatmulLadder } from "./matmul_ladder.ts";
import { benchRoofline } from "./roofline.ts";

async function benchMatmul(backends: Map<string, Backend>, repeats: number) {
  const rows: Record<string, unknown>[] = [];
  const blas = loadBlas();
  if (blas) {
    // The machine's f32 matmul peak, as the reference (PyTorch, 2048^2) measured it.
    const n = 2048, a = new Float32Array(n * n).fill(0.5), c = new Float32Array(n * n);
    const s = await timeIt(repeats, () => Promise.resolve(blas.matmulTransB(a, a, c, n, n, n)));
    rows.push({
      backend: `blas (${blas.library})`,
      dtype: "F32",
      n,
      k: n,
      m: n,
      seconds: s,
      gflops: (2 * n ** 3) / s / 1e9,
    });
  }
  for (const [name, be] of backends) {
    for (const dtype of ["F32", "BF16", "F16"] as const) {
      if (name.startsWith("cpu") && dtype !== "F32" && name !== "cpu") continue;
      // Plain loops and a software GPU adapter get smaller problems so the run stays short.
      const [n, k, m] = name === "cpu"
        ? [512, 1024, 1024]
        : name === "webgpu"
        ? [128, 1024, 1024]
        : [64, 512, 512];
      const x = be.tensor(new Float32Array(n * k).fill(0.1), [n, k]);
      const w = be.uploadWeight(weightOf(dtype, m, k));
      const s = await timeIt(repeats, async () => {
        const y = be.matmul(x, w);
        await be.read(y);
        be.free(y);
      });
      be.free(x), be.freeWeight(w);
      rows.push({
        backend: name,
        device: be.description,
        dtype,
        n,
        k,
        m,
        seconds: s,
        gflops: (2 * n * k * m) / s / 1e9,
      });
      console.error(
        `matmul ${name} ${dtype} ${n}x${k}x${m}: ${((2 * n * k * m) / s / 1e9).toFixed(2)} GFLOP/s`,
      );
    }
  }
  return rows;
}

export const matmulSection: BenchSection = {
  name: "matmul",
  async run({ backends, repeats }) {
    const out: Record<string, unknown> = { matmul: await benchMatmul(backends, repeats) };
    const gpu = backends.get("webgpu");
    if (gpu instanceof WebGpuBackend) {
      const roofline = await benchRoofline(gpu, repeats);
      out.roofline = roofline;
      out.matmulLadder = await benchMatmulLadder(gpu, repeats, roofline);
      out.matmulBackward = await benchMatmulBackward(gpu, repeats);
    }
    return out;
  },
};
