// deno task bench: speed and memory, measured side by side in one run, written to
// results/bench/<date>.json. Sections:
//   matmul    GFLOP/s per backend and weight dtype (and the machine's BLAS peak); for
//             webgpu also the device's roofline (memory bandwidth, f32 FMA peak), the
//             kernel ladder (naive, tiled, blocked, gemv) at a prefill and a decode shape
//             (and large ones on a fast device) as fractions of it, with the adapter's
//             features and limits, and the backward kernels (tiled, blocked) at training
//             shapes, checked against the CPU
//   attention webgpu attention kernels (naive, tiled) side by side at a prefill and a
//             decode shape of a real model's heads and of the default model's, and the
//             backward kernels at two training shapes, each checked against the CPU
//             reference
//   forward   default-model forward tokens/s per backend
//   decode    greedy decoding with the KV cache, tokens/s, device submits per token and
//             GPU time per kernel per token (timestamp queries, where the adapter has them)
//   train     training tokens/s (forward + backward + AdamW, routed and shared experts
//             trainable) per backend; on WebGPU also a step's submits and dispatches
//   layerwise peak memory of the layer-wise mode vs all weights resident, on a generated
//             multi-GB sharded checkpoint (each mode in its own process, peak RSS from /proc)
//   wasm-gemm the WebAssembly SIMD GEMM (the matmul without OpenBLAS) beside OpenBLAS, GFLOP/s
//             (lib/bench/wasm_gemm.ts)
//   divergence the searches' JS divergence per entry: the JS loop and f64 SIMD lanes on one
//             thread, SIMD on the default threads, and WebGPU's kernel (the expert search
//             with --backend webgpu), on flat and peaked rows

import {
  argmaxRow,
  type AttentionShape,
  type Backend,
  type Tensor,
} from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { createBackend, parseCli, positiveInt, runMain, UsageError } from "../lib/cli.ts";
import { f32ToBf16Bits, type RawTensor } from "../lib/io/safetensors.ts";
import { forward, type KvCache } from "../lib/model/decoder.ts";
import {
  cachedLogits,
  createKvCache,
  forwardCached,
  freeKvCache,
  greedyDecode,
} from "../lib/model/generate.ts";
import { Model } from "../lib/model/model.ts";
import { countParams, median } from "../lib/eval/measure.ts";
import { writeSyntheticDeepseek } from "../lib/model/synthetic.ts";
import {
  ATTENTION_KERNELS,
  type AttentionKernel,
  type KernelTime,
  MATMUL_BACKWARD_KERNELS,
  MATMUL_KERNELS,
  WebGpuBackend,
} from "../lib/backend/webgpu.ts";
import { loadBlas } from "../lib/backend/blas.ts";
import { gitCommit, writeJsonAtomic } from "../lib/io/results.ts";
import { hasDeviceDivergence, supportsTraining } from "../lib/backend/backend.ts";
import { ADAMW_DEFAULTS, Optimizer, selectTrainable, trainStep } from "../lib/train/trainer.ts";
import { JS_EPS, Reference } from "../lib/methods/divergence.ts";
import { coreThreads, defaultThreads } from "../lib/backend/cpu_rows.ts";
import { mulberry32 } from "../lib/random.ts";
import { enableOnModel } from "../lib/methods/compressed_experts.ts";
import { benchWasmGemm } from "../lib/bench/wasm_gemm.ts";

const USAGE = `Usage: deno task bench [options]

  --only LIST        sections to run: matmul,attention,forward,decode,train,layerwise,
                     divergence,wasm-gemm (default all)
  --backends LIST    cpu,cpu-reference,webgpu (default all; an unavailable one is recorded, not fatal)
  --model DIR        model for the forward section (default data/models/tiny-deepseek-moe)
  --repeats N        timed repeats per measurement, median reported (default 3)
  --synthetic-dir D  where the generated checkpoint is cached (default results/tmp/synthetic-moe)
  --out FILE         result JSON (default results/bench/<date>.json)`;

const SCHEMA_VERSION = 1;
const SECTIONS = [
  "matmul",
  "attention",
  "forward",
  "decode",
  "train",
  "layerwise",
  "divergence",
  "wasm-gemm",
];
const DEFAULT_MODEL = new URL("../data/models/tiny-deepseek-moe", import.meta.url).pathname;

// A DeepSeekMoE-shaped model of 2.4 GB in bf16 (13 shards): big enough that "one layer resident"
// and "all resident" differ by an order of magnitude.
const SYNTHETIC_CONFIG = {
  vocab_size: 32000,
  hidden_size: 1024,
  intermediate_size: 4096,
  moe_intermediate_size: 512,
  num_hidden_layers: 12,
  num_attention_heads: 8,
  num_key_value_heads: 8,
  n_routed_experts: 64,
  n_shared_experts: 2,
  num_experts_per_tok: 6,
  first_k_dense_replace: 1,
  max_position_embeddings: 512,
};

/**
 * Median seconds of `call` on each backend over `repeats` interleaved rounds (one call of
 * each, round-robin), so a slow spell on the machine hits them all alike.
 */
async function roundRobin<B, T>(
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

async function timeIt(repeats: number, fn: () => Promise<void>): Promise<number> {
  await fn(); // warm-up (pipeline compilation, page faults)
  const times: number[] = [];
  for (let i = 0; i < repeats; i++) {
    const t0 = performance.now();
    await fn();
    times.push((performance.now() - t0) / 1000);
  }
  return median(times);
}

function weightOf(dtype: "F32" | "BF16" | "F16", m: number, k: number): RawTensor {
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
 * roundRobin on the GPU: per item the median wall time of `call` (which reads its result
 * back) and, where the adapter has timestamp queries, the median GPU time of its kernels
 * (a GPU's kernels can take microseconds, far below a submit and a read back), measured
 * in the same interleaved rounds; without timestamps `device` is the wall time.
 */
async function roundRobinGpu<B>(
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
async function benchRoofline(gpu: WebGpuBackend, repeats: number) {
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

interface Roofline {
  copyGBps: number;
  f32Gflops: number;
}

/**
 * Every matmul kernel of the webgpu backend at the prefill and decode shapes, per dtype,
 * timed in interleaved rounds (roundRobin, wall time with the result read back), and where
 * the adapter has timestamp queries also by the kernels' GPU time; each as a fraction of
 * the roofline: prefill GFLOP/s of the f32 FMA peak, decode weight GB/s of the memory
 * bandwidth.
 */
async function benchMatmulLadder(gpu: WebGpuBackend, repeats: number, roofline: Roofline) {
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
async function benchMatmulBackward(gpu: WebGpuBackend, repeats: number) {
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

// Attention shapes: 16 heads of 128 (a 1-2B model's) at a 512-token prefill and a decode
// step over 1,024 cached keys, and the default model's 4 heads of 64 at its forward bench
// shape and a decode step over 256 keys.
const DEFAULT_MODEL_2X256: AttentionShape = {
  batch: 2,
  qLen: 256,
  kvLen: 256,
  heads: 4,
  kvHeads: 4,
  headDim: 64,
  window: null,
};
const ATTENTION_SHAPES: Record<string, AttentionShape> = {
  prefill: { batch: 1, qLen: 512, kvLen: 512, heads: 16, kvHeads: 16, headDim: 128, window: null },
  decode: { batch: 1, qLen: 1, kvLen: 1024, heads: 16, kvHeads: 16, headDim: 128, window: null },
  "prefill-default-model": DEFAULT_MODEL_2X256,
  "decode-default-model": {
    batch: 1,
    qLen: 1,
    kvLen: 256,
    heads: 4,
    kvHeads: 4,
    headDim: 64,
    window: null,
  },
};
// The backward (training) shapes: the default model's heads at its finetuning length
// (2 x 256) and at 4 times that length.
const ATTENTION_BACKWARD_SHAPES: Record<string, AttentionShape> = {
  "train-default-model": DEFAULT_MODEL_2X256,
  "train-long": {
    batch: 1,
    qLen: 1024,
    kvLen: 1024,
    heads: 4,
    kvHeads: 4,
    headDim: 64,
    window: null,
  },
};
// A kernel whose result is further than this from the CPU reference did not compute the
// whole thing (llvmpipe ends a loop after 65,535 iterations): its time is not comparable.
const ATTENTION_EXACT_TOL = 1e-4;

/** max |got - want| over max |want|, over all the pairs of arrays together. */
function maxRelError(got: Float32Array[], want: Float32Array[]): number {
  let maxDiff = 0, maxAbs = 0;
  for (const [a, w] of want.entries()) {
    for (let i = 0; i < w.length; i++) {
      maxDiff = Math.max(maxDiff, Math.abs(got[a][i] - w[i]));
      maxAbs = Math.max(maxAbs, Math.abs(w[i]));
    }
  }
  return maxDiff / maxAbs;
}

/** (query, key) pairs a head attends over, over the batch. */
function visiblePairs(s: AttentionShape): number {
  let visible = 0;
  for (let i = 0; i < s.qLen; i++) {
    const pos = s.kvLen - s.qLen + i;
    visible += s.window === null ? pos + 1 : Math.min(pos + 1, s.window);
  }
  return visible * s.batch;
}

/**
 * The webgpu attention kernels at each shape, timed round-robin like the matmul ladder,
 * each result checked against the CPU reference. FLOPs count q.k and p.v over the
 * visible (causal) keys only.
 */
async function benchAttention(gpu: WebGpuBackend, repeats: number) {
  const rows: Record<string, unknown>[] = [];
  const cpu = new CpuBackend();
  for (const [shape, s] of Object.entries(ATTENTION_SHAPES)) {
    const qw = s.heads * s.headDim, kw = s.kvHeads * s.headDim;
    const data = [s.qLen * qw, s.kvLen * kw, s.kvLen * kw].map((n) =>
      new Float32Array(s.batch * n).map((_, i) => Math.sin(i * 0.37 + n))
    );
    const shapes = [[s.batch * s.qLen, qw], [s.batch * s.kvLen, kw], [s.batch * s.kvLen, kw]];
    const [q, k, v] = data.map((d, i) => gpu.tensor(d, shapes[i]));
    const [cq, ck, cv] = data.map((d, i) => cpu.tensor(d, shapes[i]));
    const want = await cpu.read(cpu.attention(cq, ck, cv, s));
    const call = async (be: WebGpuBackend) => {
      const y = be.attention(q, k, v, s);
      const got = [await be.read(y)];
      be.free(y);
      return got;
    };
    const flops = 4 * s.headDim * visiblePairs(s) * s.heads;
    const variants = attentionVariants(gpu, "forward", call);
    rows.push(
      ...await timeAttentionKernels(gpu, "forward", shape, s, flops, variants, [want], repeats),
    );
    [q, k, v].forEach((x) => gpu.free(x));
  }
  rows.push(...await benchAttentionBackward(gpu, repeats));
  return {
    device: gpu.description,
    shapes: ATTENTION_SHAPES,
    backwardShapes: ATTENTION_BACKWARD_SHAPES,
    rows,
  };
}

/** One attention kernel (a label and a backend set to run it) and its call at one shape. */
interface AttentionVariant {
  kernel: string;
  call: () => Promise<Float32Array[]>;
}

/** A variant per attention kernel, each running `call` on a backend set to that kernel. */
function attentionVariants(
  gpu: WebGpuBackend,
  pass: "forward" | "backward",
  call: (be: WebGpuBackend) => Promise<Float32Array[]>,
): AttentionVariant[] {
  // The forward also runs flash-decoding's split kernel (attention_split.wgsl) on every shape.
  const kernels: string[] = [...ATTENTION_KERNELS, ...(pass === "forward" ? ["split"] : [])];
  return kernels.map((kernel) => {
    const be = kernel === "split"
      ? gpu.withOptions({ attentionSplit: "always" })
      : gpu.withOptions({ attentionKernel: kernel as AttentionKernel, attentionSplit: "never" });
    return { kernel, call: () => call(be) };
  });
}

/**
 * The variants (one pass at one shape): each checked against `want` once (which also
 * compiles its pipelines), then timed round-robin; a row per variant.
 */
async function timeAttentionKernels(
  gpu: WebGpuBackend,
  pass: "forward" | "backward",
  shape: string,
  s: AttentionShape,
  flops: number,
  variants: AttentionVariant[],
  want: Float32Array[],
  repeats: number,
): Promise<Record<string, unknown>[]> {
  const errors: number[] = [];
  for (const v of variants) errors.push(maxRelError(await v.call(), want));
  const times = await roundRobinGpu(gpu, variants, repeats, (v) => v.call());
  const rows: Record<string, unknown>[] = [], line: string[] = [];
  for (const [i, { kernel }] of variants.entries()) {
    const seconds = times.wall[i], exact = errors[i] <= ATTENTION_EXACT_TOL;
    const deviceSeconds = times.device[i], deviceTimer = times.timer;
    const [gflops, deviceGflops] = [seconds, deviceSeconds].map((t) => flops / t / 1e9);
    rows.push({
      pass,
      shape,
      kernel,
      ...s,
      seconds,
      gflops,
      deviceSeconds,
      deviceTimer,
      deviceGflops,
      maxRelError: errors[i],
      exact,
    });
    line.push(
      `${kernel} ${(seconds * 1000).toFixed(1)} ms (${deviceTimer} ${
        (deviceSeconds * 1000).toFixed(1)
      })${exact ? "" : " (WRONG RESULT)"}`,
    );
  }
  console.error(
    `attention ${pass === "backward" ? "backward " : ""}${shape} ${s.batch}x${s.qLen}/${s.kvLen} ` +
      `${s.heads}/${s.kvHeads}x${s.headDim}: ${line.join(", ")}, ` +
      `naive/tiled ${(times.wall[0] / times.wall[1]).toFixed(2)}`,
  );
  return rows;
}

/**
 * The webgpu attention backward kernels at the training shapes, timed round-robin as the
 * forward, dq, dk and dv checked against the CPU reference; and the tiled one as training
 * runs it, with the forward's logsumexp (attentionSaving, not timed): its query pass
 * walks the keys once, not twice. FLOPs are the backward's algorithmic 10 per head
 * dimension and visible pair (q.k again, dO.v, and dq, dk, dv), not counting what a
 * kernel recomputes.
 */
async function benchAttentionBackward(gpu: WebGpuBackend, repeats: number) {
  const rows: Record<string, unknown>[] = [];
  const cpu = new CpuBackend();
  for (const [shape, s] of Object.entries(ATTENTION_BACKWARD_SHAPES)) {
    const qw = s.heads * s.headDim, kw = s.kvHeads * s.headDim;
    const qShape = [s.batch * s.qLen, qw], kvShape = [s.batch * s.kvLen, kw];
    const shapes = [qShape, kvShape, kvShape, qShape];
    const data = shapes.map(([r, c], a) =>
      new Float32Array(r * c).map((_, i) => Math.sin(i * 0.37 + a))
    );
    const [q, k, v, dOut] = data.map((d, i) => gpu.tensor(d, shapes[i]));
    const [cq, ck, cv, cdOut] = data.map((d, i) => cpu.tensor(d, shapes[i]));
    const reference = cpu.attentionBackward(cq, ck, cv, cdOut, s);
    const want = await Promise.all(
      [reference.dq, reference.dk, reference.dv].map((x) => cpu.read(x)),
    );
    const call = async (be: WebGpuBackend, saved?: { out: Tensor; stats: Tensor | null }) => {
      const g = be.attentionBackward(q, k, v, dOut, s, saved);
      const got = [await be.read(g.dq), await be.read(g.dk), await be.read(g.dv)];
      for (const x of [g.dq, g.dk, g.dv]) be.free(x);
      return got;
    };
    const tiled = gpu.withOptions({ attentionKernel: "tiled" });
    const saved = tiled.attentionSaving(q, k, v, s);
    const variants = [
      ...attentionVariants(gpu, "backward", (be) => call(be)),
      { kernel: "tiled, forward's lse", call: () => call(tiled, saved) },
    ];
    const flops = 10 * s.headDim * visiblePairs(s) * s.heads;
    rows.push(
      ...await timeAttentionKernels(gpu, "backward", shape, s, flops, variants, want, repeats),
    );
    [q, k, v, dOut, saved.out, saved.stats!].forEach((x) => gpu.free(x));
  }
  return rows;
}

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

// What trains: every expert (routed experts one by one on their f32 master copies), or
// the routed experts frozen as in CD-MoE fine-tuning, where the MoE layers left run their
// experts grouped from the stacks and only pass gradients through them (o_proj in every
// architecture, plus the shared experts where there are some).
const TRAIN_SETS = [
  { trainable: "experts", label: "experts" },
  {
    trainable: "/\\.(self_attn\\.o_proj|mlp\\.shared_experts?\\.[a-z_]+)\\.weight$/",
    label: "routed experts frozen",
  },
];

async function benchTrain(backends: Map<string, Backend>, modelDir: string, repeats: number) {
  const rows: Record<string, unknown>[] = [];
  for (const [name, be] of backends) {
    if (!supportsTraining(be)) continue;
    for (const set of TRAIN_SETS) rows.push(await benchTrainSet(name, be, modelDir, repeats, set));
  }
  return rows;
}

async function benchTrainSet(
  name: string,
  be: Backend,
  modelDir: string,
  repeats: number,
  set: (typeof TRAIN_SETS)[number],
) {
  // One optimizer step on 8 x 256 tokens; the plain loops and the software GPU get 1 x 128.
  const batch = name === "cpu" ? 8 : 1, seqLen = name === "cpu" ? 256 : 128;
  const model = await Model.load(modelDir, be);
  const opt = await Optimizer.create(model, selectTrainable(model, set.trainable), {
    lr: 1e-5,
    schedule: "constant",
    warmup: 0,
    ...ADAMW_DEFAULTS,
    weightDecay: 0,
    clip: 1,
  });
  const ids = new Int32Array(batch * seqLen).map((_, i) => (i * 7919 + 13) % 256);
  const targets = ids.map((_, i) => ids[(i + 1) % ids.length]);
  const step = () => trainStep(opt, [{ ids, targets, shape: { batch, seqLen } }], 1e-5, false);
  const s = await timeIt(name === "cpu" ? repeats : 1, async () => void await step());
  // WebGPU: the waits on the device (submits) and dispatches of one more step.
  const gpu = be instanceof WebGpuBackend ? be : null;
  const [submits0, dispatches0] = gpu ? [gpu.submits, gpu.dispatches] : [0, 0];
  if (gpu) await step();
  const submitsPerStep = gpu && gpu.submits - submits0;
  const dispatchesPerStep = gpu && gpu.dispatches - dispatches0;
  model.close();
  console.error(
    `train ${name} ${batch}x${seqLen} (${set.label}): ${((batch * seqLen) / s).toFixed(0)} tok/s` +
      (gpu ? `, per step ${submitsPerStep} submits, ${dispatchesPerStep} dispatches` : ""),
  );
  return {
    backend: name,
    device: be.description,
    batch,
    seqLen,
    trainable: set.label,
    trainablePattern: set.trainable,
    trainableParams: opt.numParams,
    seconds: s,
    tokensPerSecond: (batch * seqLen) / s,
    submitsPerStep,
    dispatchesPerStep,
  };
}

/** Peak RSS of this process so far (VmHWM), in bytes. */
async function peakRss(): Promise<number> {
  const status = await Deno.readTextFile("/proc/self/status");
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

async function layerwiseChild(mode: string, dir: string): Promise<void> {
  const model = await Model.load(dir, await createBackend("cpu"));
  const batch = 2, seqLen = 128;
  const ids = new Int32Array(batch * seqLen).map((_, i) => (i * 31) % 32000);
  const t0 = performance.now();
  await forward(model, ids, { batch, seqLen }, { layerwise: mode === "layerwise" });
  const seconds = (performance.now() - t0) / 1000;
  console.log(
    JSON.stringify({
      mode,
      seconds,
      peakRssBytes: await peakRss(),
      peakResidentWeightBytes: model.peakResidentBytes,
    }),
  );
}

async function benchLayerwise(dir: string) {
  console.error(`layerwise: generating/reusing the synthetic checkpoint in ${dir} ...`);
  const totalBytes = await writeSyntheticDeepseek(dir, SYNTHETIC_CONFIG);
  const rows: Record<string, unknown>[] = [];
  for (const mode of ["layerwise", "resident"]) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        new URL(import.meta.url).pathname,
        "--child",
        mode,
        "--synthetic-dir",
        dir,
      ],
      stderr: "inherit",
    }).output();
    if (!out.success) throw new Error(`layerwise child (${mode}) failed`);
    rows.push(JSON.parse(new TextDecoder().decode(out.stdout)));
    console.error(
      `layerwise ${mode}: peak RSS ${
        (rows.at(-1)!.peakRssBytes as number / 2 ** 30).toFixed(2)
      } GiB`,
    );
  }
  // One layer's weights (the largest shard) for comparison.
  let largestLayer = 0;
  for (const e of Deno.readDirSync(dir)) {
    if (e.name.endsWith(".safetensors") && !e.name.startsWith("model-00001")) {
      largestLayer = Math.max(largestLayer, Deno.statSync(`${dir}/${e.name}`).size);
    }
  }
  return {
    config: SYNTHETIC_CONFIG,
    checkpointBytes: totalBytes,
    largestLayerBytes: largestLayer,
    runs: rows,
  };
}

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

await runMain(async () => {
  const args = parseCli(USAGE, {
    only: { type: "string" },
    backends: { type: "string" },
    model: { type: "string" },
    repeats: { type: "string" },
    "synthetic-dir": { type: "string" },
    out: { type: "string" },
    child: { type: "string" },
  });
  const syntheticDir = args["synthetic-dir"] ??
    new URL("../results/tmp/synthetic-moe", import.meta.url).pathname;
  if (args.child) return await layerwiseChild(args.child, syntheticDir);

  const sections = (args.only ?? SECTIONS.join(",")).split(",");
  for (const s of sections) {
    if (!SECTIONS.includes(s)) throw new UsageError(`unknown section "${s}"`);
  }
  const repeats = positiveInt("repeats", args.repeats, 3);
  const backends = new Map<string, Backend>();
  const unavailable: Record<string, string> = {};
  for (const name of (args.backends ?? "cpu,cpu-reference,webgpu").split(",")) {
    try {
      backends.set(name, await createBackend(name));
    } catch (e) {
      if (e instanceof UsageError) throw e;
      unavailable[name] = (e as Error).message;
      console.error(`backend ${name} unavailable: ${(e as Error).message}`);
    }
  }
  const t0 = performance.now();
  const result: Record<string, unknown> = {
    schema_version: SCHEMA_VERSION,
    kind: "bench",
    git_commit: await gitCommit(),
    date: new Date().toISOString(),
    host: {
      os: Deno.build.os,
      arch: Deno.build.arch,
      deno: Deno.version.deno,
      cpus: navigator.hardwareConcurrency,
    },
    backends: Object.fromEntries([...backends].map(([n, b]) => [n, b.description])),
    unavailable,
    settings: { sections, repeats, model: args.model ?? DEFAULT_MODEL },
  };
  if (sections.includes("matmul")) {
    result.matmul = await benchMatmul(backends, repeats);
    const gpu = backends.get("webgpu");
    if (gpu instanceof WebGpuBackend) {
      const roofline = await benchRoofline(gpu, repeats);
      result.roofline = roofline;
      result.matmulLadder = await benchMatmulLadder(gpu, repeats, roofline);
      result.matmulBackward = await benchMatmulBackward(gpu, repeats);
    }
  }
  if (sections.includes("attention")) {
    const gpu = backends.get("webgpu");
    if (gpu instanceof WebGpuBackend) result.attention = await benchAttention(gpu, repeats);
  }
  if (sections.includes("forward")) {
    const rows = await benchForward(backends, args.model ?? DEFAULT_MODEL, repeats);
    // The CPU rows as a fraction of the machine's matmul peak, where this run measured it.
    const peak = (result.matmul as Record<string, unknown>[] | undefined)
      ?.find((r) => String(r.backend).startsWith("blas"))?.gflops as number | undefined;
    for (const row of rows) {
      if (peak && String(row.backend).startsWith("cpu")) {
        row.fractionOfPeak = (row.gflops as number) / peak;
      }
    }
    result.forward = rows;
  }
  if (sections.includes("decode")) {
    result.decode = await benchDecode(backends, args.model ?? DEFAULT_MODEL);
  }
  if (sections.includes("train")) {
    result.train = await benchTrain(backends, args.model ?? DEFAULT_MODEL, repeats);
  }
  if (sections.includes("layerwise")) result.layerwise = await benchLayerwise(syntheticDir);
  if (sections.includes("divergence")) result.divergence = await benchDivergence(backends, repeats);
  if (sections.includes("wasm-gemm")) result.wasmGemm = benchWasmGemm(repeats);
  result.wall_seconds = (performance.now() - t0) / 1000;
  const out = args.out ??
    new URL(
      `../results/bench/${result.date!.toString().replace(/[:.]/g, "-")}.json`,
      import.meta.url,
    ).pathname;
  await writeJsonAtomic(out, result);
  console.error(`wrote ${out}`);
});
