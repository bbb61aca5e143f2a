// The attention section: webgpu attention kernels (naive, tiled, split) side by side at a
// prefill and a decode shape of a real model's heads and of the default model's, and the
// backward kernels at two training shapes, each checked against the CPU reference.

import type { AttentionShape, Tensor } from "../backend/backend.ts";
import { CpuBackend } from "../backend/cpu.ts";
import { ATTENTION_KERNELS, type AttentionKernel, WebGpuBackend } from "../backend/webgpu/mod.ts";
import { type BenchSection, maxRelError, roundRobinGpu } from "./common.ts";

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

/** (query, key) pairs a head attends over, over the batch. */
export function visiblePairs(s: AttentionShape): number {
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

export const attentionSection: BenchSection = {
  name: "attention",
  async run({ backends, repeats }) {
    const gpu = backends.get("webgpu");
    return gpu instanceof WebGpuBackend ? { attention: await benchAttention(gpu, repeats) } : {};
  },
};
