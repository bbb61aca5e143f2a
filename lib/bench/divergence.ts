// The divergence section: the searches' JS divergence per entry: the JS loop and f64 SIMD
// lanes on one thread, SIMD on the default threads, and WebGPU's kernel (the expert search
// with --backend webgpu), on flat and peaked rows.

import { type Backend, hasDeviceDivergence } from "../backend/backend.ts";
import { coreThreads } from "../backend/cpu_rows.ts";
import { JS_EPS, Reference } from "../methods/divergence.ts";
import { mulberry32 } from "../random.ts";
import { type BenchSection, roundRobin } from "./common.ts";

/**
 * The searches' JS divergence (lib/methods/divergence.ts), most of the expert search: ns
 * per (token, hidden) entry of the JS loop (the reference) and of the f64 SIMD lanes on
 * one thread, of SIMD on the default threads, and of WebGPU's kernel where a WebGPU
 * backend runs, round-robin. Rows of the default model's
 * hidden size and of DeepSeekMoE-16B's, flat (spread 4) and peaked (spread 300: most q
 * entries below eps, the slower ln q branch), a candidate being the rows plus 5% noise.
 */
async function benchDivergence(backends: Map<string, Backend>, repeats: number) {
  const rows: Record<string, unknown>[] = [];
  const tokens = 2048, shape = { batch: 8, seqLen: 256 };
  const threads = coreThreads();
  const variants: [string, { threads: number; simd: boolean }][] = [
    ["js-1-thread", { threads: 1, simd: false }],
    ["simd-1-thread", { threads: 1, simd: true }],
    [`simd-${threads}-threads`, { threads, simd: true }],
  ];
  // The expert search with --backend webgpu scores on the device: the kernel and the read
  // of one number a row (the candidate already there).
  const gpu = [...backends.values()].find(hasDeviceDivergence);
  for (const [dim, spread] of [[256, 4], [256, 300], [2048, 4], [2048, 300]]) {
    const random = mulberry32(dim + spread);
    const orig = Float32Array.from({ length: tokens * dim }, () => (random() - 0.5) * spread);
    const cand = orig.map((x) => x + (random() - 0.5) * spread * 0.05);
    const scorers: [string, () => Promise<number[]>][] = variants.map(([label, opts]) => {
      const ref = new Reference("js-hidden", dim, opts);
      ref.add(orig, shape);
      return [label, () => Promise.resolve(ref.docMeans(0, cand))];
    });
    const free: (() => void)[] = [];
    if (gpu) {
      const ref = new Reference("js-hidden", dim);
      ref.add(orig, shape);
      const p = gpu.tensor(ref.probs(0), [tokens, dim]), c = gpu.tensor(cand, [tokens, dim]);
      free.push(() => (gpu.free(p), gpu.free(c)));
      scorers.push(["webgpu-device", async () => {
        const js = gpu.jsDivergenceRows(p, c, JS_EPS);
        const perRow = await gpu.read(js);
        gpu.free(js);
        return ref.meansOfRows(0, perRow);
      }]);
    }
    const means = await Promise.all(scorers.map(([, score]) => score())); // also the warm-up
    const times = await roundRobin(scorers, repeats, ([, score]) => score());
    free.forEach((f) => f());
    scorers.forEach(([label], i) => {
      const maxRelDiff = Math.max(
        ...means[i].map((m, d) => Math.abs(m - means[0][d]) / means[0][d]),
      );
      rows.push({
        variant: label,
        device: label === "webgpu-device" ? gpu!.description : "cpu",
        dim,
        spread,
        tokens,
        seconds: times[i],
        nsPerEntry: (times[i] * 1e9) / (tokens * dim),
        maxRelDiffFromJs: maxRelDiff,
      });
      console.error(
        `divergence ${label} dim ${dim} spread ${spread}: ` +
          `${((times[i] * 1e9) / (tokens * dim)).toFixed(1)} ns/entry`,
      );
    });
  }
  return rows;
}

export const divergenceSection: BenchSection = {
  name: "divergence",
  async run({ backends, repeats }) {
    return { divergence: await benchDivergence(backends, repeats) };
  },
};
