// WebGPU backend: the same ops as cpu.ts, run as WGSL compute kernels (kernels/*.wgsl).
// Activations are f32 storage buffers. Weights stay in their checkpoint dtype (bf16/f16
// packed two per u32, decoded in the shader) and are split into row chunks so that no
// binding exceeds the adapter's maxStorageBufferBindingSize; activations larger than the
// limit are bound in row ranges. Dispatches are recorded into one open command encoder
// and submitted together when a result is read (or a batch fills up), so a forward pass
// costs a few submits per layer instead of one per kernel. queue.writeBuffer runs before
// any unsubmitted command, so a buffer freed while commands are pending is not handed to
// an upload until the batch is submitted (see release/acquire).

import { type RawTensor, toFloat32 } from "../io/safetensors.ts";
import {
  type AdamWHyper,
  type AttentionShape,
  checkAddRmsNorm,
  checkAttentionBackward,
  checkAttentionShape,
  checkCombine,
  checkGateUp,
  checkGrouped,
  checkMatmulSwiglu,
  checkRoutedExperts,
  checkSplitQkv,
  type CompressedRouteSpec,
  type DeviceCompressedExperts,
  expertPlan,
  type ExpertStacks,
  GATE_UP_RUN,
  kvCacheRows,
  type KvRows,
  numelOf,
  type RopeSpec,
  type RouteSpec,
  type Routing,
  rowsCols,
  type SeparateExpertStacks,
  type Tensor,
  type TrainingBackend,
  type Weight,
  type WeightDType,
} from "./backend.ts";

/** Thrown when WebGPU is unavailable or no adapter is found (tests may skip on it outside CI). */
export class NoWebGpuAdapterError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "NoWebGpuAdapterError";
  }
}

/** The wgpu backends tried unless DENO_WEBGPU_BACKEND says otherwise: not OpenGL. */
export const NATIVE_WEBGPU_BACKENDS = "vulkan,metal,dx12";

export interface WebGpuOptions {
  /**
   * Upper bound on one storage binding in bytes (default: the adapter's limit). Tests set
   * it small to exercise chunking.
   */
  maxBindingBytes?: number;
  /**
   * Which matmul kernel runs (default "auto": gemv for a few rows, else the fastest
   * prefill kernel; see MATMUL_AUTO_*). The others are the ladder, for tests and bench.
   */
  matmulKernel?: MatmulKernel | "auto";
  /**
   * Which kernels run matmulBackward's input and weight gradients (default "auto":
   * "blocked"). "tiled" is kernels/matmul_backward.wgsl, "blocked"
   * matmul_backward_blocked.wgsl.
   */
  matmulBackwardKernel?: MatmulBackwardKernel | "auto";
  /**
   * Which attention kernels run, forward and backward (default "auto": see
   * attentionKernelFor). "naive" is kernels/attention.wgsl and attention_backward.wgsl,
   * "tiled" kernels/attention_tiled.wgsl and attention_backward_tiled.wgsl.
   */
  attentionKernel?: AttentionKernel | "auto";
  /**
   * Flash-decoding (kernels/attention_split.wgsl) for the forward: "auto" (the default)
   * for decode steps over long caches when attentionKernel is "auto", "always" for every
   * shape (tests), "never".
   */
  attentionSplit?: "auto" | "always" | "never";
}

/** The matmul kernels, simplest first: kernels/matmul_<name>.wgsl ("tiled" is matmul.wgsl). */
export const MATMUL_KERNELS = ["naive", "tiled", "blocked", "gemv"] as const;
export type MatmulKernel = (typeof MATMUL_KERNELS)[number];

/** The backward matmul kernels, simplest first: kernels/matmul_backward[_blocked].wgsl. */
export const MATMUL_BACKWARD_KERNELS = ["tiled", "blocked"] as const;
export type MatmulBackwardKernel = (typeof MATMUL_BACKWARD_KERNELS)[number];

// "auto": gemv up to this many rows. Since gemv went to 8 lanes x 32 columns it takes
// 0.2-0.4x blocked's time at 8 rows on llvmpipe, 0.6-0.8x at 32 and ties near 48 (K x M
// 256 x 1024, 1024 x 1024, 2048 x 1408, f32). On a GPU gemv re-reads the weights once per
// 8 rows, but blocked's 128-row tiles leave a 32-row batch to a handful of workgroups
// (M / 128), so 32 is kept below the measured tie; a real GPU should confirm it.
export const MATMUL_AUTO_GEMV_MAX_ROWS = 32;
// "auto" above that: the register-blocked kernel, the fastest prefill kernel measured.
export const MATMUL_AUTO_PREFILL: MatmulKernel = "blocked";
// Output rows and columns per workgroup of kernels/matmul_blocked.wgsl and
// matmul_backward_blocked.wgsl (16 x TM, 16 x TN, TM = TN = 8).
const MATMUL_BLOCKED_TILE = 128;

/**
 * TM of the register-blocked kernels for this many output rows: 4 (64-row tiles) where
 * 128-row tiles would mostly multiply zeros.
 */
function blockedRowsPerThread(rows: number): number {
  return rows <= MATMUL_BLOCKED_TILE / 2 ? 4 : 8;
}
// Output columns and most rows of x per workgroup of kernels/matmul_gemv.wgsl (its COLS
// and MAX_ROWS).
const MATMUL_GEMV_COLS = 32;
const MATMUL_GEMV_MAX_ROWS = 8;
// Rows of a gateUp stack's gate run and matching up run (ExpertStacks).
const GATE_UP_BLOCK = 2 * GATE_UP_RUN;
// Most experts kernels/moe.wgsl plan_experts groups on the device (its PLAN_MAX_EXPERTS).
const PLAN_MAX_EXPERTS = 1024;
// Most routed (token, expert) pairs it groups. Its one workgroup is meant for decode-sized
// batches: each expert's thread scans every pair about 3 times, so a large prefill would
// run long on one workgroup (and past llvmpipe's silent cap of 65,535 loop iterations a
// thread). Larger batches take plan_count, plan_scan and plan_place: a workgroup per
// PLAN_CHUNK tokens, three dispatches instead of one.
const PLAN_MAX_ENTRIES = 16384;
const PLAN_CHUNK = 256;

/**
 * Threads a row of kernels/divergence.wgsl: 4 to 64, at least 32 entries a thread. On
 * llvmpipe at width 256 (ns an entry): 64 threads a row 44-59, 16 threads 33-37, 8
 * threads 31, 4 threads 30.
 */
function divergenceLanes(dim: number): number {
  let lanes = 4;
  while (lanes < 64 && lanes * 2 * 32 <= dim) lanes *= 2;
  return lanes;
}

/** The attention kernels, simplest first. */
export const ATTENTION_KERNELS = ["naive", "tiled"] as const;
export type AttentionKernel = (typeof ATTENTION_KERNELS)[number];
// kernels/attention_tiled.wgsl and attention_backward_tiled.wgsl: 64 threads in groups
// of 4 lanes, 8 past head_dim 128 (so a lane holds at most 8 vec4s of a row: head_dim up
// to 8 x 8 x 4), 2 rows per group, workgroup memory in floats (16 KiB, WebGPU's default
// limit); the forward's most keys a tile, the backward's rows a tile at most (its
// MAX_TILE: the query pass keeps a tile's scores in registers).
const ATTN_TILED_THREADS = 64;
const ATTN_TILED_WIDE_HEAD_DIM = 128;
export const ATTN_TILED_MAX_HEAD_DIM = 256;
const ATTN_TILED_SHARED_FLOATS = 4096;
const ATTN_TILED_MAX_KEYS = 64;

/** Lanes (threads) a row of the tiled attention kernels. */
const attentionLanes = (headDim: number) => headDim > ATTN_TILED_WIDE_HEAD_DIM ? 8 : 4;
// kernels/attention_split.wgsl: keys per split (its SPLIT_KEYS). "auto" runs it for decode
// steps, at most ATTN_SPLIT_MAX_ROWS query rows per kv head.
const ATTN_SPLIT_KEYS = 256;
const ATTN_SPLIT_MAX_ROWS = 8;
const ATTN_BACKWARD_MAX_TILE = 16;

const KERNEL_FILES = [
  "weights",
  "matmul_common",
  "matmul_grouped",
  "matmul",
  "matmul_naive",
  "matmul_tiles",
  "matmul_blocked",
  "matmul_gemv",
  "norm",
  "elementwise",
  "rope",
  "attention_common",
  "attention",
  "attention_tiled",
  "attention_split",
  "embedding",
  "argmax",
  "moe",
  // backward (training)
  "matmul_backward_common",
  "matmul_backward",
  "matmul_backward_blocked",
  "norm_backward",
  "elementwise_backward",
  "attention_backward_common",
  "attention_backward",
  "attention_backward_tiled",
  "moe_backward",
  "loss",
  "adamw",
  // the searches
  "divergence",
  // the bench's f32 peak probe
  "roofline",
] as const;
type KernelFile = (typeof KERNEL_FILES)[number];

// Kernels that decode weights get kernels/weights.wgsl prepended.
const USES_WEIGHTS: ReadonlySet<KernelFile> = new Set([
  "matmul",
  "matmul_naive",
  "matmul_blocked",
  "matmul_gemv",
  "norm",
  "embedding",
  "matmul_backward",
  "matmul_backward_blocked",
  "norm_backward",
]);

// The forward matmul ladder gets kernels/matmul_common.wgsl (params, bindings) as well.
const MATMUL_FORWARD: ReadonlySet<KernelFile> = new Set([
  "matmul",
  "matmul_naive",
  "matmul_blocked",
  "matmul_gemv",
]);
// The backward ones kernels/matmul_backward_common.wgsl, and the register-blocked ones of
// both directions the tile core, kernels/matmul_tiles.wgsl.
const MATMUL_BACKWARD: ReadonlySet<KernelFile> = new Set([
  "matmul_backward",
  "matmul_backward_blocked",
]);
// The grouped ones (forward, and the blocked input gradient) the tile table,
// kernels/matmul_grouped.wgsl.
const MATMUL_GROUPED: ReadonlySet<KernelFile> = new Set([
  ...MATMUL_FORWARD,
  "matmul_backward_blocked",
]);
const MATMUL_TILES: ReadonlySet<KernelFile> = new Set([
  "matmul_blocked",
  "matmul_backward_blocked",
]);

// The forward attention kernels get kernels/attention_common.wgsl (params, bindings), the
// backward ones kernels/attention_backward_common.wgsl.
const ATTENTION_FORWARD: ReadonlySet<KernelFile> = new Set([
  "attention",
  "attention_tiled",
  "attention_split",
]);
const ATTENTION_BACKWARD: ReadonlySet<KernelFile> = new Set([
  "attention_backward",
  "attention_backward_tiled",
]);

const kernelSources = new Map<KernelFile, string>();

async function loadKernelSources(): Promise<void> {
  for (const name of KERNEL_FILES) {
    if (kernelSources.has(name)) continue;
    const url = new URL(`../../kernels/${name}.wgsl`, import.meta.url);
    kernelSources.set(name, await Deno.readTextFile(url));
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

export class GpuTensor implements Tensor {
  constructor(readonly buffer: GPUBuffer, readonly shape: readonly number[]) {}
  get bytes(): number {
    return numelOf(this.shape) * 4;
  }
}

interface WeightChunk {
  buffer: GPUBuffer;
  /** First row of the weight held by this chunk, and how many rows. */
  row0: number;
  rows: number;
}

export class GpuWeight implements Weight {
  constructor(
    readonly name: string,
    readonly shape: readonly number[],
    readonly dtype: WeightDType,
    readonly chunks: WeightChunk[],
  ) {}
}

const DTYPE_CODE: Record<WeightDType, number> = { F32: 0, F16: 1, BF16: 2 };
const DTYPE_BYTES: Record<WeightDType, number> = { F32: 4, F16: 2, BF16: 2 };

/** A storage binding: a whole buffer or a byte range of it. */
interface Binding {
  buffer: GPUBuffer;
  offset?: number;
  size?: number;
  /** The kernel writes it (read_write storage). */
  write?: boolean;
}

/**
 * One split_qkv dispatch: input rows r0 .. r0 + rows, the k and v bindings they are written
 * to and their cache-row mapping [row0, kv_seq_len, kv_capacity, kv_past] (kernels/rope.wgsl).
 */
interface SplitRun {
  r0: number;
  rows: number;
  k: Binding & { skip: number };
  v: Binding & { skip: number };
  kvMap: number[];
}

interface Dispatch {
  kernel: KernelFile;
  entry: string;
  constants?: Record<string, number>;
  /** Uniform fields in declaration order: u32 as numbers, f32 as { f32 }. */
  params: (number | { f32: number })[];
  bindings: Binding[];
  /** Workgroup count, laid out on a 2-D grid by the kernels that use num_workgroups. */
  workgroups: number | [number, number];
}

/**
 * What backends on one device share (withMaxBindingBytes): the buffer pool, pipeline
 * caches and the batch being recorded. The batch: its encoder and open compute pass,
 * the uniforms of its dispatches (one slot each, written to uniformBuffer just before
 * the submit) and the buffers freed since it began (GPU-written outputs may reuse them;
 * uploads may not, as queue.writeBuffer runs before any unsubmitted command).
 */
interface SharedState {
  pipelines: Map<string, GPUComputePipeline>;
  layouts: Map<string, [GPUBindGroupLayout, GPUPipelineLayout]>;
  modules: Map<string, GPUShaderModule>;
  pool: Map<number, GPUBuffer[]>;
  pooledBytes: number;
  encoder: GPUCommandEncoder | null;
  pass: GPUComputePassEncoder | null;
  uniformBuffer: GPUBuffer;
  uniformData: ArrayBuffer;
  batched: number;
  /** Batches submitted so far (the bench counts them per decoded token). */
  submits: number;
  /** When the pending batch got its first command, and host time from there to the submit
   * summed over every batch so far: the encoding that bounds decoding on a fast GPU. */
  batchStart: number;
  encodeMilliseconds: number;
  retiring: Map<number, GPUBuffer[]>;
  retiringBytes: number;
  /** Set while timeKernels runs: each dispatch gets its own pass with two timestamps. */
  timer: KernelTimer | null;
  /** The last RoPE tables splitQkv uploaded (sharedRopeTables). */
  ropeTables: { key: string; cos: GPUBuffer; sin: GPUBuffer } | null;
  /** Bind groups by uniform slot and bound ranges (bindGroup), buffers by a numeric id. */
  bindGroups: Map<string, GPUBindGroup>;
  bindGroupsCreated: number;
  bufferIds: WeakMap<GPUBuffer, number>;
  nextBufferId: number;
}

/** Per-kernel GPU time (timestamp queries), gathered batch by batch as batches finish. */
interface KernelTimer {
  querySet: GPUQuerySet;
  resolved: GPUBuffer;
  /** The pending batch's dispatches, by name, in order (query pair i is dispatch i). */
  names: string[];
  reads: Promise<void>[];
  times: Map<string, KernelTime>;
}

export interface KernelTime {
  dispatches: number;
  milliseconds: number;
}

const t = (x: Tensor) => x as GpuTensor;
const w = (x: Weight) => x as GpuWeight;
const ceilDiv = (a: number, b: number) => Math.ceil(a / b);

/**
 * How kernels/attention_tiled.wgsl covers a shape: groups sharing one query row (SPLIT:
 * the most that leaves at most half the rows idle, so decode still keeps every group
 * busy), keys per tile (the most whose K or V tile, also the merge buffer, and partial
 * dots fit in workgroup memory) and workgroups per (sequence, kv head).
 */
export function attentionTiling(
  s: AttentionShape,
): { lanes: number; split: number; keys: number; blocks: number } {
  const lanes = attentionLanes(s.headDim), groups = ATTN_TILED_THREADS / lanes;
  const rows = groups * 2; // (query, head) rows a workgroup
  const queryRows = s.qLen * (s.heads / s.kvHeads); // (query, head) rows per kv head
  let split = 1;
  while (split < groups && rows / (2 * split) >= queryRows) split *= 2;
  const rowFloats = ceilDiv(s.headDim, 4 * lanes) * 4 * lanes; // whole vec4s per lane
  const partialsPerKey = ATTN_TILED_THREADS * 2;
  const fits = (keys: number) =>
    Math.max(keys, split > 1 ? groups / 2 : 0) * rowFloats +
        partialsPerKey * ceilDiv(keys, split) <= ATTN_TILED_SHARED_FLOATS;
  let keys = ATTN_TILED_MAX_KEYS;
  while (!fits(keys)) keys--;
  return { lanes, split, keys, blocks: ceilDiv(queryRows, rows / split) };
}

/**
 * How kernels/attention_backward_tiled.wgsl covers a shape: lanes per thread group, rows
 * per tile of each pass, the most that fit in workgroup memory (the query pass: a K and a
 * V tile and the partial (q . k, dO . v) of every thread's 2 rows per key; the key pass:
 * a Q and a dO tile, their (lse, D) and the partials), and workgroups per (sequence, kv
 * head) of each pass.
 */
export function attentionBackwardTiling(s: AttentionShape): {
  lanes: number;
  keys: number;
  queryRows: number;
  queryBlocks: number;
  keyBlocks: number;
} {
  const lanes = attentionLanes(s.headDim);
  const rowsPerBlock = (ATTN_TILED_THREADS / lanes) * 2;
  const rowFloats = ceilDiv(s.headDim, 4 * lanes) * 4 * lanes; // whole vec4s per lane
  const partialFloats = 2 * ATTN_TILED_THREADS * 2;
  const most = (floatsPerRow: number) =>
    Math.min(ATTN_BACKWARD_MAX_TILE, Math.floor(ATTN_TILED_SHARED_FLOATS / floatsPerRow));
  return {
    lanes,
    keys: most(2 * rowFloats + partialFloats),
    queryRows: most(2 * rowFloats + 2 + partialFloats),
    queryBlocks: ceilDiv(s.qLen * (s.heads / s.kvHeads), rowsPerBlock),
    keyBlocks: ceilDiv(s.kvLen, rowsPerBlock),
  };
}

/**
 * Weights split into chunks of whole rows, a row being the last dimension (a 1-D weight
 * is one row): a stack of experts [G, M, K] splits like [G * M, K], so one expert larger
 * than a binding spreads over chunks.
 */
const weightRows = (shape: readonly number[]) =>
  shape.length >= 2 ? numelOf(shape) / shape[shape.length - 1] : 1;

// The most Params a kernel has: attention_backward_common.wgsl's 17 u32s, padded to 16 bytes.
const UNIFORM_BYTES = 80;
// Dispatches per submitted batch: their uniforms share one buffer, one slot each.
const BATCH_DISPATCHES = 1024;
// Bind groups kept for reuse (a decode step of the default model uses 81); the cache is
// dropped whole when full, so groups of buffers long gone do not pile up.
const BIND_GROUP_CACHE = 4096;
// Buffers freed while a batch is pending are held back; past this many bytes, submit.
const RETIRING_BYTES = 256 * 1024 * 1024;
const MAX_WORKGROUPS_PER_DIM = 65535;
// Freed buffers kept for reuse, at most this many bytes in all; the rest are destroyed.
const POOL_BYTES = 256 * 1024 * 1024;

/** Where each group's rows start, and the total: [G + 1], as the grouped kernels read it. */
function groupStarts(groupRows: Int32Array): Int32Array {
  const starts = new Int32Array(groupRows.length + 1);
  groupRows.forEach((n, g) => starts[g + 1] = starts[g] + n);
  return starts;
}

/**
 * RoPE's cos and sin tables [rows, headDim / 2], sin times `sinSign` (-1 rotates back), in
 * the same f32 arithmetic as the CPU reference and HF (WGSL's cos and sin are only bounded
 * on [-pi, pi], and angles reach thousands of radians).
 */
function ropeTables(rope: RopeSpec, headDim: number, sinSign: 1 | -1) {
  const { positions, theta, linearFactor } = rope;
  const n = positions.length, half = headDim / 2;
  const cos = new Float32Array(n * half), sin = new Float32Array(n * half);
  for (let i = 0; i < half; i++) {
    const invFreq = Math.fround(1 / Math.fround(theta ** ((2 * i) / headDim)));
    for (let r = 0; r < n; r++) {
      const angle = Math.fround((positions[r] / linearFactor) * invFreq);
      cos[r * half + i] = Math.cos(angle);
      sin[r * half + i] = sinSign * Math.sin(angle);
    }
  }
  return { cos, sin };
}

/** The attention kernels' uniforms: the shape, then where each tensor's row 0 starts. */
function attentionParams(seqs: number, s: AttentionShape, ranges: { skip: number }[]) {
  return [
    seqs,
    s.qLen,
    s.kvLen,
    s.heads,
    s.kvHeads,
    s.headDim,
    s.window ?? 0,
    { f32: 1 / Math.sqrt(s.headDim) },
    ...ranges.map((r) => r.skip),
  ];
}

/** The grouped rows of plan_experts (or expertPlan uploaded), in device buffers. */
type DevicePlan = Record<"groupStart" | "order" | "sources" | "scales", GPUBuffer>;

/**
 * The rows a group can be expected to hold, for the grouped tile size (any size is
 * correct: the grid covers every tile): twice the mean n k / E, as routing is uneven, and
 * no more than n (a token picks an expert once). The same where the host plans, so that
 * both plans run the same kernels and give the same sums.
 */
function groupRowsHint(n: number, k: number, experts: number): number {
  return Math.min(n, Math.ceil((2 * n * k) / experts));
}

export class WebGpuBackend implements TrainingBackend, DeviceCompressedExperts {
  readonly name = "webgpu" as const;
  readonly f32Weights = false;
  readonly maxBindingBytes: number;
  readonly matmulKernel: MatmulKernel | "auto";
  readonly matmulBackwardKernel: MatmulBackwardKernel;
  readonly attentionKernel: AttentionKernel | "auto";
  private readonly offsetAlign: number;
  private readonly emptyBuffer: GPUBuffer;
  private firstError: string | null = null;
  private readonly uniformSlot: number;
  /** Pools, caches and the pending batch, shared by every backend on this device. */
  private readonly shared: SharedState;
  /** Compute dispatches issued so far (tests check that chunked ops really split). */
  dispatches = 0;

  /** Batches submitted on this device so far. */
  get submits(): number {
    return this.shared.submits;
  }

  /** Host time spent encoding batches so far: from each one's first command to its submit. */
  get encodeMilliseconds(): number {
    return this.shared.encodeMilliseconds;
  }

  /** Bind groups created on this device so far (the rest of the dispatches reused one). */
  get bindGroupsCreated(): number {
    return this.shared.bindGroupsCreated;
  }

  constructor(
    readonly device: GPUDevice,
    readonly description: string,
    private readonly opts: WebGpuOptions = {},
    shared?: SharedState,
  ) {
    const limit = device.limits.maxStorageBufferBindingSize;
    // Multiple of 4 so every chunk of whole f32 rows or padded 16-bit weights fits.
    this.maxBindingBytes = Math.floor(Math.min(opts.maxBindingBytes ?? limit, limit) / 4) * 4;
    this.offsetAlign = device.limits.minStorageBufferOffsetAlignment;
    const uniformAlign = device.limits.minUniformBufferOffsetAlignment;
    this.uniformSlot = ceilDiv(UNIFORM_BYTES, uniformAlign) * uniformAlign;
    this.shared = shared ?? {
      pipelines: new Map(),
      layouts: new Map(),
      modules: new Map(),
      pool: new Map(),
      pooledBytes: 0,
      encoder: null,
      pass: null,
      uniformBuffer: device.createBuffer({
        size: BATCH_DISPATCHES * this.uniformSlot,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
      }),
      uniformData: new ArrayBuffer(BATCH_DISPATCHES * this.uniformSlot),
      batched: 0,
      submits: 0,
      batchStart: 0,
      encodeMilliseconds: 0,
      retiring: new Map(),
      retiringBytes: 0,
      timer: null,
      ropeTables: null,
      bindGroups: new Map(),
      bindGroupsCreated: 0,
      bufferIds: new WeakMap(),
      nextBufferId: 0,
    };
    this.matmulKernel = opts.matmulKernel ?? "auto";
    if (this.matmulKernel !== "auto" && !MATMUL_KERNELS.includes(this.matmulKernel)) {
      throw new Error(`webgpu: unknown matmul kernel "${this.matmulKernel}"`);
    }
    const backwardKernel = opts.matmulBackwardKernel ?? "auto";
    // "auto": the blocked kernels, about 4x faster than tiled on llvmpipe at 128 x 512 x
    // 1024 and 1.2-2x at an expert's 32 x 256 x 128 (bench's matmulBackward section).
    this.matmulBackwardKernel = backwardKernel === "auto" ? "blocked" : backwardKernel;
    if (!MATMUL_BACKWARD_KERNELS.includes(this.matmulBackwardKernel)) {
      throw new Error(`webgpu: unknown backward matmul kernel "${backwardKernel}"`);
    }
    this.attentionKernel = opts.attentionKernel ?? "auto";
    if (this.attentionKernel !== "auto" && !ATTENTION_KERNELS.includes(this.attentionKernel)) {
      throw new Error(`webgpu: unknown attention kernel "${this.attentionKernel}"`);
    }
    this.emptyBuffer = this.createBuffer(16);
    device.addEventListener("uncapturederror", (e) => {
      const msg = (e as GPUUncapturedErrorEvent).error.message;
      console.error(`WebGPU error: ${msg}`);
      this.firstError ??= msg;
    });
  }

  /** A backend on the same device with these options changed (the rest kept). */
  withOptions(opts: WebGpuOptions): WebGpuBackend {
    // Shared state: tensors pass between the two and their commands stay in one order.
    return new WebGpuBackend(
      this.device,
      this.description,
      { ...this.opts, ...opts },
      this.shared,
    );
  }

  /** A backend on the same device with a smaller binding limit (tests of chunking). */
  withMaxBindingBytes(maxBindingBytes: number): WebGpuBackend {
    return this.withOptions({ maxBindingBytes });
  }

  // ---- memory -------------------------------------------------------------------------

  private createBuffer(size: number): GPUBuffer {
    return this.device.createBuffer({
      size,
      usage: GPUBufferUsage.STORAGE | GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_SRC |
        GPUBufferUsage.COPY_DST,
    });
  }

  /**
   * A pooled buffer of at least `bytes` (rounded up to 16 so near sizes share a list).
   * `gpuWritten`: only commands recorded from now on write it, so a buffer freed in the
   * pending batch will do; anything written by queue.writeBuffer must not take one.
   */
  private acquire(bytes: number, gpuWritten = false): GPUBuffer {
    const size = Math.max(16, ceilDiv(bytes, 16) * 16);
    if (size > this.device.limits.maxBufferSize) {
      throw new Error(
        `webgpu: a ${size}-byte buffer exceeds maxBufferSize ${this.device.limits.maxBufferSize}`,
      );
    }
    const retired = gpuWritten ? this.shared.retiring.get(size) : undefined;
    if (retired && retired.length > 0) {
      this.shared.retiringBytes -= size;
      return retired.pop()!;
    }
    const list = this.shared.pool.get(size);
    if (list && list.length > 0) {
      this.shared.pooledBytes -= size;
      return list.pop()!;
    }
    return this.createBuffer(size);
  }

  private release(buffer: GPUBuffer): void {
    if (this.shared.encoder) {
      // Pending commands may still read it: hold it back until they are submitted.
      const list = this.shared.retiring.get(buffer.size) ?? [];
      list.push(buffer);
      this.shared.retiring.set(buffer.size, list);
      this.shared.retiringBytes += buffer.size;
      if (this.shared.retiringBytes > RETIRING_BYTES) this.flush();
      return;
    }
    if (this.shared.pooledBytes + buffer.size > POOL_BYTES) {
      buffer.destroy();
      return;
    }
    const list = this.shared.pool.get(buffer.size) ?? [];
    list.push(buffer);
    this.shared.pool.set(buffer.size, list);
    this.shared.pooledBytes += buffer.size;
  }

  /** A pooled buffer holding `data` (padded to 4 bytes); release it after the dispatch. */
  private upload(data: ArrayBufferView): GPUBuffer {
    const buffer = this.acquire(data.byteLength);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (bytes.length % 4 === 0) {
      this.device.queue.writeBuffer(
        buffer,
        0,
        bytes.buffer as ArrayBuffer,
        bytes.byteOffset,
        bytes.length,
      );
    } else {
      const padded = new Uint8Array(ceilDiv(bytes.length, 4) * 4);
      padded.set(bytes);
      this.device.queue.writeBuffer(buffer, 0, padded);
    }
    return buffer;
  }

  /** An output tensor for the next recorded command to write. */
  private newTensor(shape: readonly number[]): GpuTensor {
    return new GpuTensor(this.acquire(numelOf(shape) * 4, true), [...shape]);
  }

  uploadWeight(raw: RawTensor): Weight {
    if (raw.dtype !== "F32" && raw.dtype !== "BF16" && raw.dtype !== "F16") {
      throw new Error(`weight "${raw.name}": dtype ${raw.dtype} is not a float type`);
    }
    const dtype = raw.dtype;
    const rows = weightRows(raw.shape);
    const rowBytes = (numelOf(raw.shape) / Math.max(rows, 1)) * DTYPE_BYTES[dtype];
    if (raw.bytes.length !== numelOf(raw.shape) * DTYPE_BYTES[dtype]) {
      throw new Error(
        `weight "${raw.name}": ${raw.bytes.length} bytes for shape [${raw.shape}] ${dtype}`,
      );
    }
    if (rowBytes > this.maxBindingBytes) {
      throw new Error(
        `weight "${raw.name}": a row of ${rowBytes} bytes exceeds the binding limit ` +
          `${this.maxBindingBytes}`,
      );
    }
    const fit = Math.max(1, Math.floor(this.maxBindingBytes / Math.max(rowBytes, 1)));
    // Whole 8-row blocks where they fit, so a gateUp stack's gate/up pairs share a chunk.
    const rowsPerChunk = fit >= GATE_UP_BLOCK ? fit - fit % GATE_UP_BLOCK : fit;
    const chunks: WeightChunk[] = [];
    for (let row0 = 0; row0 < rows || chunks.length === 0; row0 += rowsPerChunk) {
      const n = Math.min(rowsPerChunk, rows - row0);
      const bytes = raw.bytes.subarray(row0 * rowBytes, (row0 + n) * rowBytes);
      // Padded to 4 bytes: an odd count of 16-bit values leaves half a word.
      const buffer = this.device.createBuffer({
        size: Math.max(4, ceilDiv(bytes.length, 4) * 4),
        // COPY_SRC: readWeight copies chunks out (trainable master weights, checks).
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC,
        mappedAtCreation: true,
      });
      new Uint8Array(buffer.getMappedRange()).set(bytes);
      buffer.unmap();
      chunks.push({ buffer, row0, rows: n });
    }
    return new GpuWeight(raw.name, [...raw.shape], dtype, chunks);
  }

  freeWeight(weight: Weight): void {
    this.flush(); // pending commands may read it, and a destroyed buffer fails their submit
    for (const c of w(weight).chunks) c.buffer.destroy();
    w(weight).chunks.length = 0;
  }

  tensor(data: Float32Array, shape: readonly number[]): Tensor {
    if (data.length !== numelOf(shape)) {
      throw new Error(
        `tensor data has ${data.length} entries, shape [${shape}] needs ${numelOf(shape)}`,
      );
    }
    const out = new GpuTensor(this.acquire(data.length * 4), [...shape]);
    // writeBuffer takes no shared memory (the searches' arrays the CPU row threads share)
    const src = data.buffer instanceof SharedArrayBuffer ? data.slice() : data;
    if (src.length > 0) {
      this.device.queue.writeBuffer(
        out.buffer,
        0,
        src.buffer as ArrayBuffer,
        src.byteOffset,
        src.byteLength,
      );
    }
    return out;
  }

  async read(x: Tensor): Promise<Float32Array> {
    const bytes = t(x).bytes;
    if (bytes === 0) {
      this.throwIfFailed();
      return new Float32Array(0);
    }
    return new Float32Array(await this.readBytes(t(x).buffer, bytes));
  }

  async readAll(xs: readonly Tensor[]): Promise<Float32Array[]> {
    const all = await this.readRanges(xs.map((x) => ({ buffer: t(x).buffer, size: t(x).bytes })));
    return all.map((bytes) => new Float32Array(bytes));
  }

  /** The first `bytes` bytes (a multiple of 4) of a buffer, copied to the host. */
  private async readBytes(buffer: GPUBuffer, bytes: number): Promise<ArrayBuffer> {
    return (await this.readRanges([{ buffer, size: bytes }]))[0];
  }

  /** The first `size` bytes (multiples of 4) of each buffer: one staging buffer, one submit. */
  private async readRanges(ranges: { buffer: GPUBuffer; size: number }[]): Promise<ArrayBuffer[]> {
    this.throwIfFailed();
    const total = ranges.reduce((s, r) => s + r.size, 0);
    if (total === 0) return ranges.map(() => new ArrayBuffer(0));
    const staging = this.device.createBuffer({
      size: total,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    const encoder = this.recordOutsidePass();
    let offset = 0;
    for (const r of ranges) {
      if (r.size > 0) encoder.copyBufferToBuffer(r.buffer, 0, staging, offset, r.size);
      offset += r.size;
    }
    this.flush();
    await staging.mapAsync(GPUMapMode.READ);
    const mapped = staging.getMappedRange();
    offset = 0;
    const out = ranges.map((r) => mapped.slice(offset, offset += r.size));
    staging.unmap();
    staging.destroy();
    this.throwIfFailed();
    return out;
  }

  free(x: Tensor): void {
    this.release(t(x).buffer);
  }

  /** WebGPU reports validation errors asynchronously; surface the first at the next read. */
  private throwIfFailed(): void {
    if (this.firstError !== null) throw new Error(`webgpu: ${this.firstError}`);
  }

  // ---- dispatch -----------------------------------------------------------------------

  private pipeline(d: Dispatch): GPUComputePipeline {
    const kinds = d.bindings.map((b) => (b.write ? "w" : "r")).join("");
    const key = `${d.kernel}:${d.entry}:${kinds}:${JSON.stringify(d.constants ?? {})}`;
    let pipeline = this.shared.pipelines.get(key);
    if (pipeline) return pipeline;
    let module = this.shared.modules.get(d.kernel);
    if (!module) {
      const src = kernelSources.get(d.kernel)!;
      const prelude = [
        USES_WEIGHTS.has(d.kernel) ? kernelSources.get("weights") : "",
        MATMUL_FORWARD.has(d.kernel) ? kernelSources.get("matmul_common") : "",
        MATMUL_BACKWARD.has(d.kernel) ? kernelSources.get("matmul_backward_common") : "",
        MATMUL_GROUPED.has(d.kernel) ? kernelSources.get("matmul_grouped") : "",
        MATMUL_TILES.has(d.kernel) ? kernelSources.get("matmul_tiles") : "",
        ATTENTION_FORWARD.has(d.kernel) ? kernelSources.get("attention_common") : "",
        ATTENTION_BACKWARD.has(d.kernel) ? kernelSources.get("attention_backward_common") : "",
      ];
      const code = `${prelude.join("\n")}\n${src}`;
      module = this.device.createShaderModule({ label: d.kernel, code });
      this.shared.modules.set(d.kernel, module);
    }
    pipeline = this.device.createComputePipeline({
      label: `${d.kernel}.${d.entry}`,
      layout: this.layout(kinds)[1],
      compute: { module, entryPoint: d.entry, constants: d.constants ?? {} },
    });
    this.shared.pipelines.set(key, pipeline);
    return pipeline;
  }

  /** Explicit layouts (binding 0 uniform, then storage) so unused bindings are harmless. */
  private layout(kinds: string): [GPUBindGroupLayout, GPUPipelineLayout] {
    let layout = this.shared.layouts.get(kinds);
    if (layout) return layout;
    const entries: GPUBindGroupLayoutEntry[] = [
      { binding: 0, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform" } },
    ];
    [...kinds].forEach((k, i) =>
      entries.push({
        binding: i + 1,
        visibility: GPUShaderStage.COMPUTE,
        buffer: { type: k === "w" ? "storage" : "read-only-storage" },
      })
    );
    const group = this.device.createBindGroupLayout({ entries });
    layout = [group, this.device.createPipelineLayout({ bindGroupLayouts: [group] })];
    this.shared.layouts.set(kinds, layout);
    return layout;
  }

  /** Record one dispatch into the pending batch; its uniforms get the next slot. */
  private run(d: Dispatch): void {
    for (const b of d.bindings) {
      const size = b.size ?? b.buffer.size;
      // The invariant chunking exists for; with a test-sized limit it proves the split.
      if (size > this.maxBindingBytes) {
        throw new Error(
          `webgpu: ${d.kernel}.${d.entry} binds ${size} bytes, over the limit ` +
            `${this.maxBindingBytes}`,
        );
      }
    }
    const uniformOffset = this.shared.batched * this.uniformSlot;
    const params = new DataView(this.shared.uniformData, uniformOffset, UNIFORM_BYTES);
    d.params.forEach((v, i) => {
      if (typeof v === "number") params.setUint32(4 * i, v, true);
      else params.setFloat32(4 * i, v.f32, true);
    });
    const pipeline = this.pipeline(d);
    const kinds = d.bindings.map((b) => (b.write ? "w" : "r")).join("");
    const bindGroup = this.bindGroup(kinds, uniformOffset, d.bindings);
    let [x, y] = typeof d.workgroups === "number" ? [d.workgroups, 1] : d.workgroups;
    if (typeof d.workgroups === "number" && x > MAX_WORKGROUPS_PER_DIM) {
      // Flat kernels recover their index as (wg.y * num_workgroups.x + wg.x); the extra
      // workgroups of the last row find an index past the end and return.
      y = ceilDiv(x, MAX_WORKGROUPS_PER_DIM);
      x = MAX_WORKGROUPS_PER_DIM;
    }
    const encoder = this.pendingEncoder();
    const timer = this.shared.timer;
    if (timer) {
      // One pass per dispatch, timestamped at its start and end.
      this.shared.pass?.end();
      const index = 2 * timer.names.length;
      timer.names.push(`${d.kernel}.${d.entry}${d.constants ? JSON.stringify(d.constants) : ""}`);
      this.shared.pass = encoder.beginComputePass({
        timestampWrites: {
          querySet: timer.querySet,
          beginningOfPassWriteIndex: index,
          endOfPassWriteIndex: index + 1,
        },
      });
    }
    this.shared.pass ??= encoder.beginComputePass();
    this.shared.pass.setPipeline(pipeline);
    this.shared.pass.setBindGroup(0, bindGroup);
    this.shared.pass.dispatchWorkgroups(x, y);
    this.dispatches++;
    if (++this.shared.batched === BATCH_DISPATCHES) this.flush();
  }

  /**
   * The bind group of a dispatch's uniform slot and bindings, reused when the same slot,
   * buffers and ranges come again: a decode step repeats the previous one's (its batch
   * starts at slot 0 and the pool hands out the same buffers in the same order), and
   * creating one took about a third of a step's host time. A destroyed buffer's id never
   * recurs, so no cached group with one is used; the cache is dropped when it grows large.
   */
  private bindGroup(kinds: string, uniformOffset: number, bindings: Binding[]): GPUBindGroup {
    const ids = this.shared.bufferIds;
    let key = `${kinds}@${uniformOffset}`;
    for (const b of bindings) {
      let id = ids.get(b.buffer);
      if (id === undefined) ids.set(b.buffer, id = this.shared.nextBufferId++);
      key += `,${id}+${b.offset ?? 0}:${b.size ?? b.buffer.size}`;
    }
    const cached = this.shared.bindGroups.get(key);
    if (cached) return cached;
    if (this.shared.bindGroups.size >= BIND_GROUP_CACHE) this.shared.bindGroups.clear();
    const group = this.device.createBindGroup({
      layout: this.layout(kinds)[0],
      entries: [
        {
          binding: 0,
          resource: {
            buffer: this.shared.uniformBuffer,
            offset: uniformOffset,
            size: UNIFORM_BYTES,
          },
        },
        ...bindings.map((b, i) => ({
          binding: i + 1,
          resource: { buffer: b.buffer, offset: b.offset ?? 0, size: b.size ?? b.buffer.size },
        })),
      ],
    });
    this.shared.bindGroups.set(key, group);
    this.shared.bindGroupsCreated++;
    return group;
  }

  /** The pending batch's encoder, begun (and its host encoding timed) on first use. */
  private pendingEncoder(): GPUCommandEncoder {
    if (!this.shared.encoder) {
      this.shared.encoder = this.device.createCommandEncoder();
      this.shared.batchStart = performance.now();
    }
    return this.shared.encoder;
  }

  /** The pending encoder with no compute pass open, for copies and clears. */
  private recordOutsidePass(): GPUCommandEncoder {
    this.shared.pass?.end();
    this.shared.pass = null;
    return this.pendingEncoder();
  }

  /**
   * Submit the pending batch: its uniforms first (writeBuffer is ordered before the
   * submit), then the commands; buffers freed meanwhile go back to the pool.
   */
  flush(): void {
    if (!this.shared.encoder) return;
    const encoder = this.recordOutsidePass();
    if (this.shared.batched > 0) {
      this.device.queue.writeBuffer(
        this.shared.uniformBuffer,
        0,
        this.shared.uniformData,
        0,
        this.shared.batched * this.uniformSlot,
      );
    }
    const timer = this.shared.timer;
    const timings = timer && timer.names.length > 0 ? this.resolveTimestamps(encoder, timer) : null;
    this.device.queue.submit([encoder.finish()]);
    timings?.();
    this.shared.submits++;
    this.shared.encodeMilliseconds += performance.now() - this.shared.batchStart;
    this.shared.encoder = null;
    this.shared.batched = 0;
    const retired = this.shared.retiring;
    this.shared.retiring = new Map();
    this.shared.retiringBytes = 0;
    for (const list of retired.values()) for (const b of list) this.release(b);
  }

  /**
   * GPU time per kernel (name, entry point and pipeline constants) of the dispatches `work`
   * records, from timestamp queries. Each dispatch then runs in its own compute pass, so
   * the sum is a little above the time of the usual one-pass batches; nothing is read back
   * between dispatches. Needs the adapter's "timestamp-query" feature.
   */
  async timeKernels(work: () => Promise<void>): Promise<Map<string, KernelTime>> {
    if (!this.device.features.has("timestamp-query")) {
      throw new Error(`webgpu: ${this.description} has no "timestamp-query" feature`);
    }
    if (this.shared.timer) throw new Error("webgpu: timeKernels is already running");
    this.flush();
    const timer: KernelTimer = {
      querySet: this.device.createQuerySet({ type: "timestamp", count: 2 * BATCH_DISPATCHES }),
      resolved: this.device.createBuffer({
        size: 2 * BATCH_DISPATCHES * 8,
        usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
      }),
      names: [],
      reads: [],
      times: new Map(),
    };
    this.shared.timer = timer;
    try {
      await work();
      this.flush();
      await Promise.all(timer.reads);
    } finally {
      this.shared.timer = null;
      timer.querySet.destroy();
      timer.resolved.destroy();
    }
    this.throwIfFailed();
    return timer.times;
  }

  /**
   * Record the batch's timestamps into a staging buffer; the returned function, called
   * after the submit, maps it and adds each dispatch's end - start to its kernel's total.
   */
  private resolveTimestamps(encoder: GPUCommandEncoder, timer: KernelTimer): () => void {
    const names = timer.names, bytes = names.length * 16;
    timer.names = [];
    const staging = this.device.createBuffer({
      size: bytes,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    encoder.resolveQuerySet(timer.querySet, 0, 2 * names.length, timer.resolved, 0);
    encoder.copyBufferToBuffer(timer.resolved, 0, staging, 0, bytes);
    return () =>
      timer.reads.push(
        staging.mapAsync(GPUMapMode.READ).then(() => {
          const ns = new BigInt64Array(staging.getMappedRange());
          names.forEach((name, i) => {
            const time = timer.times.get(name) ?? { dispatches: 0, milliseconds: 0 };
            time.dispatches++;
            time.milliseconds += Number(ns[2 * i + 1] - ns[2 * i]) / 1e6;
            timer.times.set(name, time);
          });
          staging.unmap();
          staging.destroy();
        }),
      );
  }

  /**
   * Split `rows` rows into ranges whose bindings stay under maxBindingBytes, for tensors
   * with the given bytes per row. A range is bound from the aligned offset at or below its
   * start (rowRange), so each binding may carry up to offsetAlign - 4 leading bytes.
   * Returns [firstRow, rowCount] pairs.
   */
  private rowChunks(rows: number, bytesPerRow: number[]): [number, number][] {
    if (rows === 0) return [];
    if (bytesPerRow.every((b) => rows * b <= this.maxBindingBytes)) return [[0, rows]];
    const usable = this.maxBindingBytes - (this.offsetAlign - 4);
    const perChunk = Math.min(...bytesPerRow.map((b) => Math.floor(usable / b)));
    if (perChunk < 1) {
      throw new Error(
        `webgpu: a row of [${bytesPerRow}] bytes does not fit the binding limit ` +
          `${this.maxBindingBytes}`,
      );
    }
    const out: [number, number][] = [];
    for (let r = 0; r < rows; r += perChunk) out.push([r, Math.min(perChunk, rows - r)]);
    return out;
  }

  /**
   * Rows [r0, r0 + n) of a row-major f32/i32 buffer with `rowBytes` bytes per row, bound
   * from the aligned offset at or below the first row; `skip` is the number of 4-byte
   * entries before row r0 within the binding, passed to the kernel.
   */
  private rowRange(
    buffer: GPUBuffer,
    r0: number,
    n: number,
    rowBytes: number,
    write = false,
  ): Binding & { skip: number } {
    const start = r0 * rowBytes;
    const offset = start - (start % this.offsetAlign);
    return {
      buffer,
      offset,
      size: start + n * rowBytes - offset,
      write,
      skip: (start - offset) / 4,
    };
  }

  // ---- ops ----------------------------------------------------------------------------

  embedding(table: Weight, tokens: Int32Array | Tensor): Tensor {
    const [vocab, h] = table.shape;
    const host = tokens instanceof Int32Array, count = host ? tokens.length : numelOf(tokens.shape);
    if (host) {
      for (const id of tokens) {
        if (id < 0 || id >= vocab) throw new Error(`token id ${id} out of range [0, ${vocab})`);
      }
    }
    const out = this.newTensor([count, h]); // [tokens, hidden]
    const idsBuf = host ? this.upload(tokens) : t(tokens).buffer;
    for (const chunk of w(table).chunks) {
      for (const [r0, n] of this.rowChunks(count, [h * 4])) {
        const outRange = this.rowRange(out.buffer, r0, n, h * 4, true);
        this.run({
          kernel: "embedding",
          entry: "embedding",
          constants: { W_DTYPE: DTYPE_CODE[table.dtype] },
          params: [n, h, chunk.row0, chunk.rows, r0, outRange.skip],
          bindings: [{ buffer: idsBuf, size: count * 4 }, { buffer: chunk.buffer }, outRange],
          workgroups: ceilDiv(n * h, 64),
        });
      }
    }
    if (host) this.release(idsBuf);
    return out;
  }

  argmaxRows(x: Tensor): Tensor {
    const [n, cols] = rowsCols(x);
    if (cols === 0) throw new Error("argmaxRows: rows of no columns");
    const ids = this.newTensor([n]);
    for (const [r0, rows] of this.rowChunks(n, [cols * 4])) {
      const xRange = this.rowRange(t(x).buffer, r0, rows, cols * 4);
      this.run({
        kernel: "argmax",
        entry: "argmax_rows",
        params: [rows, cols, r0, xRange.skip],
        bindings: [xRange, { buffer: ids.buffer, size: n * 4, write: true }],
        workgroups: rows,
      });
    }
    return ids;
  }

  rmsNorm(x: Tensor, weight: Weight, eps: number): Tensor {
    const [n, d] = rowsCols(x);
    if (numelOf(weight.shape) !== d) {
      throw new Error(`rmsNorm: rows of ${d} but weight "${weight.name}" is [${weight.shape}]`);
    }
    const out = this.newTensor(x.shape);
    for (const [r0, rows] of this.rowChunks(n, [d * 4])) {
      const xRange = this.rowRange(t(x).buffer, r0, rows, d * 4);
      const outRange = this.rowRange(out.buffer, r0, rows, d * 4, true);
      this.run({
        kernel: "norm",
        entry: "rms_norm",
        constants: { W_DTYPE: DTYPE_CODE[weight.dtype] },
        params: [rows, d, { f32: eps }, xRange.skip, outRange.skip],
        bindings: [xRange, { buffer: w(weight).chunks[0].buffer }, outRange],
        workgroups: rows,
      });
    }
    return out;
  }

  addRmsNorm(a: Tensor, b: Tensor, weight: Weight, eps: number): { sum: Tensor; normed: Tensor } {
    checkAddRmsNorm(a, b, weight);
    const [n, d] = rowsCols(a);
    const sum = this.newTensor(a.shape), normed = this.newTensor(a.shape);
    for (const [r0, rows] of this.rowChunks(n, [d * 4])) {
      const aRange = this.rowRange(t(a).buffer, r0, rows, d * 4);
      const bRange = this.rowRange(t(b).buffer, r0, rows, d * 4);
      const sumRange = this.rowRange(sum.buffer, r0, rows, d * 4, true);
      const normedRange = this.rowRange(normed.buffer, r0, rows, d * 4, true);
      this.run({
        kernel: "norm",
        entry: "add_rms_norm",
        constants: { W_DTYPE: DTYPE_CODE[weight.dtype] },
        params: [
          rows,
          d,
          { f32: eps },
          aRange.skip,
          normedRange.skip,
          bRange.skip,
          sumRange.skip,
        ],
        bindings: [aRange, { buffer: w(weight).chunks[0].buffer }, normedRange, bRange, sumRange],
        workgroups: rows,
      });
    }
    return { sum, normed };
  }

  matmul(x: Tensor, weight: Weight, bias?: Weight): Tensor {
    const [m, k] = weight.shape, [, xCols] = rowsCols(x);
    if (weight.shape.length !== 2 || xCols !== k) {
      throw new Error(
        `matmul: x has ${xCols} columns but weight "${weight.name}" is [${weight.shape}]`,
      );
    }
    if (bias && numelOf(bias.shape) !== m) {
      throw new Error(`matmul: bias "${bias.name}" is [${bias.shape}], want [${m}]`);
    }
    return this.matmulOn(x, weight, bias, false);
  }

  matmulSwiglu(x: Tensor, gateUp: Weight): Tensor {
    checkMatmulSwiglu(x, gateUp);
    this.checkWholeGateUpBlocks(gateUp, gateUp.shape[0]);
    return this.matmulOn(x, gateUp, undefined, true);
  }

  /**
   * The SWIGLU epilogue pairs the gate and up columns of each 8-row block in one
   * workgroup, so a gateUp weight's chunks and matrices (m rows each) hold whole blocks.
   */
  private checkWholeGateUpBlocks(gateUp: Weight, m: number) {
    const split = (row: number) => row % GATE_UP_BLOCK !== 0;
    if (split(m) || w(gateUp).chunks.some((c) => split(c.row0))) {
      throw new Error(
        `webgpu: "${gateUp.name}" [${gateUp.shape}] splits a gate/up block: the binding ` +
          `limit ${this.maxBindingBytes} holds fewer than ${GATE_UP_BLOCK} rows`,
      );
    }
  }

  /**
   * x @ weight^T (+ bias), or with swiglu over interleaved gate/up rows, silu(gate) * up
   * (half the columns; only the gemv and blocked kernels have that epilogue, so a forced
   * naive or tiled kernel gives way to blocked there).
   */
  private matmulOn(x: Tensor, weight: Weight, bias: Weight | undefined, swiglu: boolean) {
    const [n, k] = rowsCols(x);
    const [wRows] = weight.shape;
    const m = swiglu ? wRows / 2 : wRows; // output columns
    const out = this.newTensor([n, m]); // [tokens, out features]
    let kernel = this.matmulKernelFor(n);
    if (swiglu && kernel !== "gemv") kernel = "blocked";
    const constants = {
      W_DTYPE: DTYPE_CODE[weight.dtype],
      B_DTYPE: bias ? DTYPE_CODE[bias.dtype] : 0,
      HAS_BIAS: bias ? 1 : 0,
      SWIGLU: swiglu ? 1 : 0,
    };
    const biasBuffer = bias ? w(bias).chunks[0].buffer : this.emptyBuffer;
    // Each weight chunk writes its own band of output columns.
    for (const chunk of w(weight).chunks) {
      for (const [r0, rows] of this.rowChunks(n, [k * 4, m * 4])) {
        const xRange = this.rowRange(t(x).buffer, r0, rows, k * 4);
        const outRange = this.rowRange(out.buffer, r0, rows, m * 4, true);
        const params = [rows, k, chunk.rows, m, chunk.row0, xRange.skip, outRange.skip];
        const bindings: Binding[] = [
          xRange,
          { buffer: chunk.buffer },
          { buffer: biasBuffer },
          outRange,
        ];
        if (kernel === "naive") {
          this.run({
            kernel: "matmul_naive",
            entry: "main",
            constants,
            params,
            bindings,
            workgroups: [ceilDiv(chunk.rows, 64), ceilDiv(rows, 4)],
          });
        } else if (kernel === "tiled") {
          this.run({
            kernel: "matmul",
            entry: "main",
            constants,
            params,
            bindings,
            workgroups: [ceilDiv(chunk.rows, 16), ceilDiv(rows, 16)],
          });
        } else {
          const vec = this.vecViews(kernel, weight.dtype, k, xRange, chunk.buffer);
          bindings.push(
            ...vec.bindings,
            { buffer: this.emptyBuffer }, // the group starts of groupedMatmul
            { buffer: this.emptyBuffer }, // and its gathered rows
          );
          const vecConstants: Record<string, number> = { ...constants, ...vec.constants };
          // gemv: rows of x per workgroup, so that N = 1 does one row's work.
          const gemvRows = Math.min(rows, MATMUL_GEMV_MAX_ROWS);
          if (kernel === "gemv") vecConstants.ROWS = gemvRows;
          else vecConstants.TM = blockedRowsPerThread(rows);
          this.run({
            kernel: kernel === "gemv" ? "matmul_gemv" : "matmul_blocked",
            entry: "main",
            constants: vecConstants,
            params,
            bindings,
            workgroups: kernel === "gemv"
              // Flat: one workgroup per MATMUL_GEMV_COLS columns x gemvRows rows.
              ? ceilDiv(chunk.rows, MATMUL_GEMV_COLS) * ceilDiv(rows, gemvRows)
              // Output tiles of the kernel's BN x BM.
              : [ceilDiv(chunk.rows, MATMUL_BLOCKED_TILE), ceilDiv(rows, 16 * vecConstants.TM)],
          });
        }
      }
    }
    return out;
  }

  /**
   * The vec4 views (bindings 5, 6) blocked and gemv read x and w through, where K and the
   * offset allow, else placeholders; and the switches that turn them on. x rows start on
   * a vec4 when K and skip are multiples of 4 (the binding then ends on one). Elements in
   * one vec4 of w: f32 runs of 4 (both kernels), f16/bf16 runs of 8 (gemv); blocked reads
   * f16/bf16 runs of 4 as two whole words of w instead, which only needs K even.
   */
  private vecViews(
    kernel: "blocked" | "gemv",
    dtype: WeightDType,
    k: number,
    xRange: Binding & { skip: number },
    wBuffer: GPUBuffer,
  ): { bindings: Binding[]; constants: { VEC_X: number; VEC_W: number } } {
    const vecX = k % 4 === 0 && xRange.skip % 4 === 0;
    const w4Elements = dtype === "F32" ? 4 : kernel === "gemv" ? 8 : 0;
    const vecW = w4Elements > 0 ? k % w4Elements === 0 : k % 2 === 0;
    return {
      bindings: [
        vecX ? { ...xRange, write: false } : { buffer: this.emptyBuffer },
        vecW && w4Elements > 0 ? { buffer: wBuffer } : { buffer: this.emptyBuffer },
      ],
      constants: { VEC_X: vecX ? 1 : 0, VEC_W: vecW ? 1 : 0 },
    };
  }

  /** The matmul kernel for n rows of x: the configured one, or the "auto" choice. */
  matmulKernelFor(n: number): MatmulKernel {
    if (this.matmulKernel !== "auto") return this.matmulKernel;
    return n <= MATMUL_AUTO_GEMV_MAX_ROWS ? "gemv" : MATMUL_AUTO_PREFILL;
  }

  groupedMatmul(x: Tensor, stack: Weight, groupRows: Int32Array): Tensor {
    const [r, k] = rowsCols(x);
    checkGrouped(stack, k, groupRows, r);
    const startBuf = this.upload(groupStarts(groupRows));
    const out = this.groupedOn(x, stack, startBuf, Math.max(0, ...groupRows));
    this.release(startBuf);
    return out;
  }

  /**
   * groupedMatmul with the group starts [G + 1] in a device buffer, maybe written by an
   * earlier kernel (plan_experts): each workgroup finds its tile from them, the grid sized
   * for the most tiles the rows could need, so the host needs no counts. `groupRows` is
   * the rows a group holds (the largest, or an estimate): it picks gemv or the blocked
   * tile size, and any value gives the same result.
   */
  private groupedOn(
    x: Tensor,
    stack: Weight,
    groupStart: GPUBuffer,
    groupRows: number,
    swiglu = false,
    gather?: { rows: GPUBuffer; count: number },
  ) {
    const [xRows, k] = rowsCols(x);
    // gather: the grouped rows are x's rows in the order `gather.rows` lists (GATHER), x
    // bound whole; else x's own rows, bound in row ranges as needed.
    const r = gather ? gather.count : xRows;
    const [, m] = stack.shape;
    // swiglu: a gateUp stack (ExpertStacks), silu(gate) * up written, half the columns.
    const outWidth = swiglu ? m / 2 : m;
    const out = this.newTensor([r, outWidth]); // [rows of all groups, out features]
    // Few rows per expert (decode): gemv tiles of up to 8 rows, no more than a group can
    // have (one token, one row of work); else blocked tiles of 128 rows, or of 64 where no
    // group has more (a tile holds one group's rows, so a 33-64-row group would leave half
    // of a 128-row tile idle).
    const gemv = groupRows <= MATMUL_AUTO_GEMV_MAX_ROWS;
    const tm = blockedRowsPerThread(groupRows);
    const tileRows = gemv ? Math.max(1, Math.min(groupRows, MATMUL_GEMV_MAX_ROWS)) : 16 * tm;
    if (swiglu) this.checkWholeGateUpBlocks(stack, m);
    const wholeX = { buffer: t(x).buffer, size: t(x).bytes, skip: 0 };
    const rowBytes = gather ? [outWidth * 4] : [k * 4, outWidth * 4];
    const dispatches = this.groupedDispatches(stack, r, rowBytes, tileRows);
    for (const { chunk, r0, rows, capacity, tail } of dispatches) {
      const xRange = gather ? wholeX : this.rowRange(t(x).buffer, r0, rows, k * 4);
      const outRange = this.rowRange(out.buffer, r0, rows, outWidth * 4, true);
      const vec = this.vecViews(gemv ? "gemv" : "blocked", stack.dtype, k, xRange, chunk.buffer);
      const constants: Record<string, number> = {
        W_DTYPE: DTYPE_CODE[stack.dtype],
        ...vec.constants,
        GROUPED: 1,
        SWIGLU: swiglu ? 1 : 0,
        GATHER: gather ? 1 : 0,
      };
      if (gemv) constants.ROWS = tileRows;
      else constants.TM = tm;
      // Grid columns cover the widest tile; narrower tiles' extra workgroups idle.
      const cols = Math.min(m, chunk.rows);
      this.run({
        kernel: gemv ? "matmul_gemv" : "matmul_blocked",
        entry: "main",
        constants,
        params: [rows, k, cols, outWidth, 0, xRange.skip, outRange.skip, ...tail],
        bindings: [
          xRange,
          { buffer: chunk.buffer },
          { buffer: this.emptyBuffer },
          outRange,
          ...vec.bindings,
          { buffer: groupStart },
          { buffer: gather ? gather.rows : this.emptyBuffer },
        ],
        workgroups: gemv
          ? ceilDiv(cols, MATMUL_GEMV_COLS) * capacity
          : [ceilDiv(cols, MATMUL_BLOCKED_TILE), capacity],
      });
    }
    return out;
  }

  /**
   * The dispatches of a grouped kernel: each chunk of the stack (it may hold many experts
   * or part of one) times each range of the r grouped rows bound at once. The grid covers
   * the most tiles there could be (`capacity`: each non-empty group takes at most one
   * partial tile), and each workgroup finds its own from the group starts (grouped_tile,
   * kernels/matmul_grouped.wgsl); `tail` ends its Params (first_group .. tile_rows).
   */
  private *groupedDispatches(stack: Weight, r: number, rowBytes: number[], tileRows: number) {
    const m = stack.shape[1];
    for (const chunk of w(stack).chunks) {
      const g0 = Math.floor(chunk.row0 / m), g1 = ceilDiv(chunk.row0 + chunk.rows, m);
      for (const [r0, rows] of this.rowChunks(r, rowBytes)) {
        const capacity = Math.floor(rows / tileRows) + Math.min(g1 - g0, rows);
        yield {
          chunk,
          r0,
          rows,
          capacity,
          tail: [g0, g1, m, chunk.row0, chunk.rows, r0, tileRows],
        };
      }
    }
  }

  combineRows(out: Tensor, y: Tensor, sources: Int32Array, scales: Float32Array, k: number): void {
    checkCombine(rowsCols(out)[0], rowsCols(y)[0], sources, scales, k);
    const sourcesBuf = this.upload(sources), scalesBuf = this.upload(scales);
    this.combineFrom(out, y, sourcesBuf, scalesBuf, k);
    this.release(sourcesBuf);
    this.release(scalesBuf);
  }

  /** combineRows with the sources and scales in device buffers. */
  private combineFrom(out: Tensor, y: Tensor, sources: GPUBuffer, scales: GPUBuffer, k: number) {
    const [n, h] = rowsCols(out), [ny] = rowsCols(y);
    for (const [y0, yRows] of this.rowChunks(ny, [h * 4])) {
      const yRange = this.rowRange(t(y).buffer, y0, yRows, h * 4);
      for (const [r0, rows] of this.rowChunks(n, [h * 4])) {
        const outRange = this.rowRange(t(out).buffer, r0, rows, h * 4, true);
        this.run({
          kernel: "moe",
          entry: "combine_rows",
          params: [rows, h, k, r0, y0, yRows, yRange.skip, outRange.skip],
          bindings: [{ buffer: sources }, { buffer: scales }, yRange, outRange],
          workgroups: ceilDiv(rows * h, 64),
        });
      }
    }
  }

  /** out = entry(a, b) elementwise over flat ranges. */
  private elementwise(entry: string, a: Tensor, b: Tensor | null, scalar: number): Tensor {
    const out = this.newTensor(a.shape);
    const count = numelOf(a.shape);
    for (const [i0, n] of this.rowChunks(count, [4])) {
      const aRange = this.rowRange(t(a).buffer, i0, n, 4);
      const bRange = b
        ? this.rowRange(t(b).buffer, i0, n, 4)
        : { buffer: this.emptyBuffer, skip: 0 };
      const outRange = this.rowRange(out.buffer, i0, n, 4, true);
      this.run({
        kernel: "elementwise",
        entry,
        params: [n, 1, { f32: scalar }, aRange.skip, bRange.skip, outRange.skip],
        bindings: [aRange, bRange, outRange],
        workgroups: ceilDiv(n, 64),
      });
    }
    return out;
  }

  private sameSize(op: string, a: Tensor, b: Tensor): void {
    if (numelOf(a.shape) !== numelOf(b.shape)) {
      throw new Error(`${op}: shapes [${a.shape}] and [${b.shape}] differ`);
    }
  }

  add(a: Tensor, b: Tensor): Tensor {
    this.sameSize("add", a, b);
    return this.elementwise("add", a, b, 0);
  }

  mul(a: Tensor, b: Tensor): Tensor {
    this.sameSize("mul", a, b);
    return this.elementwise("mul", a, b, 0);
  }

  swiglu(gate: Tensor, up: Tensor): Tensor {
    this.sameSize("swiglu", gate, up);
    return this.elementwise("swiglu", gate, up, 0);
  }

  clamp(x: Tensor, limit: number): Tensor {
    return this.elementwise("clamp_abs", x, null, limit);
  }

  scale(y: Tensor, s: number): Tensor {
    return this.elementwise("scale", y, null, s);
  }

  sigmoidScaleRows(y: Tensor, g: Tensor): Tensor {
    const [n, d] = rowsCols(y);
    if (numelOf(g.shape) !== n) {
      throw new Error(`sigmoidScaleRows: gate [${g.shape}] for ${n} rows`);
    }
    const out = this.newTensor(y.shape);
    for (const [r0, rows] of this.rowChunks(n, [d * 4, 4])) {
      const yRange = this.rowRange(t(y).buffer, r0, rows, d * 4);
      const gRange = this.rowRange(t(g).buffer, r0, rows, 4);
      const outRange = this.rowRange(out.buffer, r0, rows, d * 4, true);
      this.run({
        kernel: "elementwise",
        entry: "sigmoid_scale_rows",
        params: [rows * d, d, { f32: 0 }, yRange.skip, gRange.skip, outRange.skip],
        bindings: [yRange, gRange, outRange],
        workgroups: ceilDiv(rows * d, 64),
      });
    }
    return out;
  }

  rope(
    x: Tensor,
    positions: Int32Array,
    heads: number,
    headDim: number,
    theta: number,
    linearFactor: number,
  ): Tensor {
    return this.rotate(x, positions, heads, headDim, theta, linearFactor, 1);
  }

  /** RoPE with the sin table times `sinSign`: -1 rotates backwards (the transpose). */
  private rotate(
    x: Tensor,
    positions: Int32Array,
    heads: number,
    headDim: number,
    theta: number,
    linearFactor: number,
    sinSign: 1 | -1,
  ): Tensor {
    const [n, d] = rowsCols(x);
    if (d !== heads * headDim) {
      throw new Error(`rope: row width ${d} != ${heads} heads x ${headDim}`);
    }
    if (positions.length !== n) throw new Error(`rope: ${positions.length} positions, ${n} rows`);
    const half = headDim / 2;
    const { cos, sin } = ropeTables({ positions, theta, linearFactor }, headDim, sinSign);
    const out = this.newTensor(x.shape);
    for (const [r0, rows] of this.rowChunks(n, [d * 4])) {
      const cosBuf = this.upload(cos.subarray(r0 * half, (r0 + rows) * half));
      const sinBuf = this.upload(sin.subarray(r0 * half, (r0 + rows) * half));
      const xRange = this.rowRange(t(x).buffer, r0, rows, d * 4);
      const outRange = this.rowRange(out.buffer, r0, rows, d * 4, true);
      this.run({
        kernel: "rope",
        entry: "rope",
        params: [rows, heads, headDim, xRange.skip, outRange.skip],
        bindings: [xRange, { buffer: cosBuf }, { buffer: sinBuf }, outRange],
        workgroups: ceilDiv(rows * heads * half, 64),
      });
      this.release(cosBuf);
      this.release(sinBuf);
    }
    return out;
  }

  splitQkv(
    qkv: Tensor,
    heads: number,
    kvHeads: number,
    headDim: number,
    rope: RopeSpec | null,
  ): { q: Tensor; k: Tensor; v: Tensor } {
    checkSplitQkv(qkv, heads, kvHeads, headDim, rope);
    const [n, d] = rowsCols(qkv), kw = kvHeads * headDim;
    const k = this.newTensor([n, kw]), v = this.newTensor([n, kw]);
    const runs = this.rowChunks(n, [d * 4, heads * headDim * 4, kw * 4]).map(([r0, rows]) => {
      const range = (x: GpuTensor) => this.rowRange(x.buffer, r0, rows, kw * 4, true);
      return { r0, rows, k: range(k), v: range(v), kvMap: [0, rows, rows, 0] };
    });
    return { q: this.splitQkvRuns(qkv, heads, kvHeads, headDim, rope, runs), k, v };
  }

  splitQkvIntoCache(
    qkv: Tensor,
    heads: number,
    kvHeads: number,
    headDim: number,
    rope: RopeSpec | null,
    cache: KvRows,
  ): Tensor {
    checkSplitQkv(qkv, heads, kvHeads, headDim, rope);
    const [n, d] = rowsCols(qkv), kw = kvHeads * headDim, qw = heads * headDim;
    kvCacheRows(cache, n, kw); // checks that the rows fit
    const { seqLen, capacity, past } = cache, k = t(cache.k), v = t(cache.v);
    let runs: SplitRun[];
    if (k.bytes <= this.maxBindingBytes) {
      // The whole caches bound: the kernel maps each row to its cache row.
      const whole = (x: GpuTensor) => ({ buffer: x.buffer, size: x.bytes, write: true, skip: 0 });
      runs = this.rowChunks(n, [d * 4, qw * 4]).map(([r0, rows]) => ({
        r0,
        rows,
        k: whole(k),
        v: whole(v),
        kvMap: [r0, seqLen, capacity, past],
      }));
    } else {
      // Caches beyond one binding: each sequence's new rows are one run of cache rows.
      runs = [];
      for (let b = 0; b < n / seqLen; b++) {
        for (const [r0, rows] of this.rowChunks(seqLen, [d * 4, qw * 4, kw * 4])) {
          const range = (x: GpuTensor) =>
            this.rowRange(x.buffer, b * capacity + past + r0, rows, kw * 4, true);
          runs.push({
            r0: b * seqLen + r0,
            rows,
            k: range(k),
            v: range(v),
            kvMap: [0, rows, rows, 0],
          });
        }
      }
    }
    return this.splitQkvRuns(qkv, heads, kvHeads, headDim, rope, runs);
  }

  /** split_qkv over `runs` of rows (SplitRun); returns q. */
  private splitQkvRuns(
    qkv: Tensor,
    heads: number,
    kvHeads: number,
    headDim: number,
    rope: RopeSpec | null,
    runs: SplitRun[],
  ): GpuTensor {
    const [n, d] = rowsCols(qkv), qw = heads * headDim, half = headDim / 2;
    const q = this.newTensor([n, qw]);
    let tables: { cos: Float32Array; sin: Float32Array } | null = null;
    for (const { r0, rows, k, v, kvMap } of runs) {
      // All rows at once (the usual case): the step's shared tables; else this run's part.
      const whole = rope && r0 === 0 && rows === n ? this.sharedRopeTables(rope, headDim) : null;
      if (rope && !whole) tables ??= ropeTables(rope, headDim, 1);
      const table = (values: Float32Array) =>
        this.upload(values.subarray(r0 * half, (r0 + rows) * half));
      const cosBuf = whole?.cos ?? (tables ? table(tables.cos) : this.emptyBuffer);
      const sinBuf = whole?.sin ?? (tables ? table(tables.sin) : this.emptyBuffer);
      const ranges = [
        this.rowRange(t(qkv).buffer, r0, rows, d * 4),
        this.rowRange(q.buffer, r0, rows, qw * 4, true),
        k,
        v,
      ];
      this.run({
        kernel: "rope",
        entry: "split_qkv",
        params: [
          rows,
          heads,
          kvHeads,
          headDim,
          rope ? 1 : 0,
          ...ranges.map((r) => r.skip),
          ...kvMap,
        ],
        bindings: [ranges[0], { buffer: cosBuf }, { buffer: sinBuf }, ...ranges.slice(1)],
        workgroups: ceilDiv(rows * (heads + 2 * kvHeads) * half, 64),
      });
      if (!whole && tables) this.release(cosBuf), this.release(sinBuf);
    }
    return q;
  }

  /**
   * `rope`'s cos/sin tables on the device, kept while the same positions come again: every
   * layer of a forward step shares them, so a decoded token uploads them once instead of
   * once a layer. One entry; the previous one's buffers go back to the pool.
   */
  private sharedRopeTables(rope: RopeSpec, headDim: number): { cos: GPUBuffer; sin: GPUBuffer } {
    const { positions, theta, linearFactor } = rope;
    const key = `${headDim} ${theta} ${linearFactor} ${positions.join()}`;
    const last = this.shared.ropeTables;
    if (last?.key === key) return last;
    if (last) this.release(last.cos), this.release(last.sin);
    const { cos, sin } = ropeTables(rope, headDim, 1);
    const entry = { key, cos: this.upload(cos), sin: this.upload(sin) };
    this.shared.ropeTables = entry;
    return entry;
  }

  attention(q: Tensor, k: Tensor, v: Tensor, s: AttentionShape): Tensor {
    return this.attentionOf(q, k, v, s, false).out;
  }

  /**
   * attention keeping each row's logsumexp where the tiled kernel runs (every training
   * shape up to head_dim 256): attentionBackward then takes D from the output and walks
   * the keys once fewer.
   */
  attentionSaving(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: AttentionShape,
  ): { out: Tensor; stats: Tensor | null } {
    return this.attentionOf(q, k, v, s, true);
  }

  private attentionOf(q: Tensor, k: Tensor, v: Tensor, s: AttentionShape, save: boolean) {
    const { batch, qLen, heads, kvHeads, headDim } = s;
    const qw = heads * headDim, kw = kvHeads * headDim;
    const stride = checkAttentionShape("attention", q, k, v, s);
    const kernel = this.checkedAttentionKernel("attention", s);
    const tiling = kernel === "tiled" ? attentionTiling(s) : null;
    const out = this.newTensor([batch * qLen, qw]); // [tokens, heads * headDim]
    // (lse, D) per (query, head) row, as the tiled backward keeps them; the forward
    // writes lse. Only the tiled kernel saves them, so saving runs it unsplit.
    const stats = save && tiling ? this.newTensor([batch * qLen * heads, 2]) : null;
    // Chunks are whole sequences: a query needs every key of its own sequence.
    const qBytes = qLen * qw * 4, kvBytes = stride * kw * 4, statBytes = qLen * heads * 8;
    for (const [b0, seqs] of this.rowChunks(batch, [qBytes, kvBytes, statBytes])) {
      const qRange = this.rowRange(t(q).buffer, b0, seqs, qBytes);
      const kRange = this.rowRange(t(k).buffer, b0, seqs, kvBytes);
      const vRange = this.rowRange(t(v).buffer, b0, seqs, kvBytes);
      const outRange = this.rowRange(out.buffer, b0, seqs, qBytes, true);
      const bindings = [qRange, kRange, vRange, outRange];
      const params = [...attentionParams(seqs, s, bindings), stride];
      const splits = stats ? 0 : this.attentionSplits(s, seqs);
      if (splits > 0) {
        const rows = seqs * qLen * heads;
        // One split writes the output itself; more leave partial results to merge.
        const partialBytes = splits > 1 ? rows * splits * (headDim + 2) * 4 : 0;
        const partials = splits > 1 ? this.acquire(partialBytes, true) : this.emptyBuffer;
        const common = {
          kernel: "attention_split" as const,
          params: [...params, splits, ATTN_SPLIT_KEYS],
          bindings: [...bindings, {
            buffer: partials,
            size: partialBytes || undefined,
            write: true,
          }],
        };
        this.run({ ...common, entry: "split_partial", workgroups: rows * splits });
        if (splits > 1) {
          this.run({ ...common, entry: "split_merge", workgroups: ceilDiv(rows * headDim, 64) });
          this.release(partials);
        }
      } else if (tiling) {
        const statsRange = stats
          ? this.rowRange(stats.buffer, b0, seqs, statBytes, true)
          : { buffer: this.emptyBuffer, write: true, skip: 0 };
        this.run({
          kernel: "attention_tiled",
          entry: "attention_tiled",
          constants: {
            HEAD_DIM: headDim,
            LANES: tiling.lanes,
            KEYS: tiling.keys,
            SPLIT: tiling.split,
            SAVE_STATS: stats ? 1 : 0,
          },
          params: [...params, 0, 0, statsRange.skip],
          bindings: [...bindings, statsRange],
          workgroups: seqs * kvHeads * tiling.blocks,
        });
      } else {
        this.run({
          kernel: "attention",
          entry: "attention",
          params,
          bindings,
          workgroups: ceilDiv(seqs * heads * qLen, 64),
        });
      }
    }
    return { out, stats };
  }

  /** attentionKernelFor, refusing a forced tiled kernel past its head_dim limit. */
  private checkedAttentionKernel(op: string, s: AttentionShape): AttentionKernel {
    const kernel = this.attentionKernelFor(s);
    if (kernel === "tiled" && s.headDim > ATTN_TILED_MAX_HEAD_DIM) {
      throw new Error(
        `${op}: the tiled kernel takes head_dim up to ${ATTN_TILED_MAX_HEAD_DIM}, not ${s.headDim}`,
      );
    }
    return kernel;
  }

  /**
   * Key splits a query for flash-decoding `seqs` sequences of shape s, or 0 to use the
   * single-pass kernels. "auto" splits decode steps: one query row a head leaves the tiled
   * kernel one workgroup per kv head walking every key. On llvmpipe (one decoded token,
   * default model) that ran 1.03x faster with a 32-token context and 1.14x with 400; over
   * 1,024 keys of 16 heads x 128 the attention alone was 1.37x faster. Prefill stays
   * unsplit: the split kernel reads every key once per query (2.0x slower at 2 x 256).
   * Not split either when the partial results would not fit one binding.
   */
  private attentionSplits(s: AttentionShape, seqs: number): number {
    const mode = this.opts.attentionSplit ?? "auto";
    const keys = Math.min(s.kvLen, s.window ?? s.kvLen);
    const splits = Math.max(1, ceilDiv(keys, ATTN_SPLIT_KEYS));
    const fits = seqs * s.qLen * s.heads * splits * (s.headDim + 2) * 4 <= this.maxBindingBytes;
    if (mode === "never" || !fits) return 0;
    if (mode === "always") return splits;
    const decode = s.qLen * (s.heads / s.kvHeads) <= ATTN_SPLIT_MAX_ROWS;
    return this.attentionKernel === "auto" && decode ? splits : 0;
  }

  /**
   * The attention kernel for a shape, forward and backward: the configured one, or the
   * "auto" choice: tiled up to its head_dim limit. On llvmpipe it ran prefill 1.5x faster
   * than naive (2 x 256, 4 heads of 64) and lost short decode steps slightly (0.9x at 256
   * keys); past about 32k / head_dim keys the naive kernel's loops exceed llvmpipe's
   * 65,535-iteration cap and its result is wrong, and on a GPU naive decode runs only
   * batch x heads threads. The naive backward is wrong there from about 13k / head_dim
   * keys (dq at 2 x 256, 4 heads of 64, where the tiled one was 2x faster).
   */
  attentionKernelFor(s: AttentionShape): AttentionKernel {
    if (this.attentionKernel !== "auto") return this.attentionKernel;
    return s.headDim <= ATTN_TILED_MAX_HEAD_DIM ? "tiled" : "naive";
  }

  async routeTopK(logits: Tensor, k: number, normalize: boolean, eps: number): Promise<Routing> {
    const [n] = rowsCols(logits);
    const result = this.route(logits, { k, normalize, eps });
    const packed = await this.read(result);
    this.free(result);
    const bits = new Int32Array(packed.buffer);
    const indices = new Int32Array(n * k), weights = new Float32Array(n * k);
    for (let r = 0; r < n; r++) {
      indices.set(bits.subarray(r * 2 * k, r * 2 * k + k), r * k);
      weights.set(packed.subarray(r * 2 * k + k, (r + 1) * 2 * k), r * k);
    }
    return { indices, weights };
  }

  /** The routing on the device, [tokens, 2k]: k expert ids, then k weights as f32 bits. */
  private route(logits: Tensor, { k, normalize, eps }: RouteSpec): GpuTensor {
    const [n, e] = rowsCols(logits);
    if (k < 1 || k > e) throw new Error(`routeTopK: k = ${k} with ${e} experts`);
    const result = this.newTensor([n, 2 * k]);
    for (const [r0, rows] of this.rowChunks(n, [e * 4, 2 * k * 4])) {
      const inRange = this.rowRange(t(logits).buffer, r0, rows, e * 4);
      const outRange = this.rowRange(result.buffer, r0, rows, 2 * k * 4, true);
      this.run({
        kernel: "moe",
        entry: "route_topk",
        params: [rows, e, k, normalize ? 1 : 0, { f32: eps }, inRange.skip, outRange.skip],
        bindings: [inRange, outRange],
        workgroups: ceilDiv(rows, 64),
      });
    }
    return result;
  }

  async routedExperts(
    xn: Tensor,
    logits: Tensor,
    stacks: ExpertStacks,
    route: RouteSpec,
    out: Tensor,
  ): Promise<void> {
    checkRoutedExperts(xn, logits, stacks, route, out);
    const [n, e] = rowsCols(logits), k = route.k;
    if (n === 0) return;
    let plan: DevicePlan;
    if (this.devicePlanFits(n, e, k)) {
      // Route and group on the device: nothing waits on the host.
      const routed = this.route(logits, route);
      plan = this.planOn(routed, n, e, k);
      this.free(routed);
    } else {
      // Routing over one binding (test-sized limits, or a batch of millions of tokens), or
      // over PLAN_MAX_EXPERTS experts: the same plan, grouped on the host.
      const host = expertPlan(await this.routeTopK(logits, k, route.normalize, route.eps), k, e);
      plan = {
        groupStart: this.upload(groupStarts(host.groupRows)),
        order: this.upload(host.order),
        sources: this.upload(host.sources),
        scales: this.upload(host.scales),
      };
    }
    const hint = groupRowsHint(n, k, e);
    // The gate|up matmul reads xn's rows through the plan's order where xn fits one binding.
    let a: GpuTensor;
    if (t(xn).bytes <= this.maxBindingBytes) {
      const gather = { rows: plan.order, count: n * k };
      a = this.groupedOn(xn, stacks.gateUp, plan.groupStart, hint, true, gather);
    } else {
      const xe = this.gatherFrom(xn, plan.order, n * k);
      a = this.groupedOn(xe, stacks.gateUp, plan.groupStart, hint, true);
      this.free(xe);
    }
    const y = this.groupedOn(a, stacks.down, plan.groupStart, hint);
    this.free(a);
    this.combineFrom(out, y, plan.sources, plan.scales, k);
    this.free(y);
    for (const buffer of Object.values(plan)) this.release(buffer);
  }

  /** Whether n tokens' k experts of e can be grouped on the device (planOn). */
  private devicePlanFits(n: number, e: number, k: number): boolean {
    const chunks = ceilDiv(n, PLAN_CHUNK);
    const fits = Math.max(n * 2 * k, e + 1, chunks * e) * 4 <= this.maxBindingBytes;
    return e <= PLAN_MAX_EXPERTS && chunks <= MAX_WORKGROUPS_PER_DIM && fits;
  }

  /**
   * The plan of a routing [n, 2k] in route_topk's layout, on the device: plan_experts, or
   * past PLAN_MAX_ENTRIES pairs plan_count, plan_scan and plan_place over chunks of
   * tokens (the same plan).
   */
  private planOn(routed: GpuTensor, n: number, e: number, k: number): DevicePlan {
    const plan = {
      groupStart: this.acquire((e + 1) * 4, true),
      order: this.acquire(n * k * 4, true),
      sources: this.acquire(n * k * 4, true),
      scales: this.acquire(n * k * 4, true),
    };
    const outputs = [
      { buffer: plan.order, write: true },
      { buffer: plan.sources, write: true },
      { buffer: plan.scales, write: true },
    ];
    const params = [n, e, k, 0], input = { buffer: routed.buffer };
    if (n * k <= PLAN_MAX_ENTRIES) {
      const bindings = [input, { buffer: plan.groupStart, write: true }, ...outputs];
      this.run({ kernel: "moe", entry: "plan_experts", params, bindings, workgroups: 1 });
      return plan;
    }
    const chunks = ceilDiv(n, PLAN_CHUNK);
    const first = this.acquire(chunks * e * 4, true); // [chunks, experts]
    const counts = { buffer: first, size: chunks * e * 4 };
    this.run({
      kernel: "moe",
      entry: "plan_count",
      params,
      bindings: [input, { ...counts, write: true }],
      workgroups: chunks,
    });
    this.run({
      kernel: "moe",
      entry: "plan_scan",
      params,
      bindings: [{ ...counts, write: true }, { buffer: plan.groupStart, write: true }],
      workgroups: 1,
    });
    this.run({
      kernel: "moe",
      entry: "plan_place",
      params,
      bindings: [input, counts, ...outputs],
      workgroups: chunks,
    });
    this.release(first);
    return plan;
  }

  /**
   * Compressed experts on the device (DeviceCompressedExperts): route_topk, split_compressed
   * (main routing and aux alphas), plan_experts over the main experts, theta as three
   * matmuls, then the main experts grouped as routedExperts runs them, gate and up apart
   * (their inputs differ) and both reading x * theta through the plan's order.
   */
  async compressedExperts(
    xn: Tensor,
    logits: Tensor,
    stacks: SeparateExpertStacks,
    ceSlots: () => Promise<readonly Weight[]>,
    route: CompressedRouteSpec,
    out: Tensor,
  ): Promise<boolean> {
    const [n, e] = rowsCols(logits), { k, mainExperts: km } = route;
    if (!Number.isInteger(km) || km < 1 || km >= k) {
      throw new Error(`compressedExperts: ${km} main experts of top-${k}`);
    }
    // x * theta is bound whole by the gathering matmuls, the alphas written whole.
    const fits = Math.max(t(xn).bytes, n * e * 4) <= this.maxBindingBytes;
    if (!fits || !this.devicePlanFits(n, e, k)) return false;
    if (n === 0) return true;
    const slots = await ceSlots(); // a trained ces is read here, before anything is recorded
    const raw = this.route(logits, { k, normalize: false, eps: 0 });
    const main = this.newTensor([n, 2 * km]), alpha = this.newTensor([n, e]);
    this.run({
      kernel: "moe",
      entry: "split_compressed",
      params: [n, e, k, km, route.normalize ? 1 : 0, { f32: route.eps }],
      bindings: [
        { buffer: raw.buffer },
        { buffer: main.buffer, write: true },
        { buffer: alpha.buffer, write: true },
      ],
      workgroups: ceilDiv(n, 64),
    });
    this.free(raw);
    const plan = this.planOn(main, n, e, km);
    this.free(main);
    const [t0, t1, t2] = slots.map((slot) => this.matmul(alpha, slot));
    const xg = this.mul(xn, t0), xu = this.mul(xn, t2);
    const hint = groupRowsHint(n, km, e), gather = { rows: plan.order, count: n * km };
    const g = this.groupedOn(xg, stacks.gate, plan.groupStart, hint, false, gather);
    const u = this.groupedOn(xu, stacks.up, plan.groupStart, hint, false, gather);
    const a = this.swiglu(g, u), t1Rows = this.gatherFrom(t1, plan.order, n * km);
    const scaled = this.mul(a, t1Rows);
    const y = this.groupedOn(scaled, stacks.down, plan.groupStart, hint);
    this.combineFrom(out, y, plan.sources, plan.scales, km);
    for (const x of [alpha, t0, t1, t2, xg, xu, g, u, a, t1Rows, scaled, y]) this.free(x);
    for (const buffer of Object.values(plan)) this.release(buffer);
    return true;
  }

  private checkRows(op: string, rows: Int32Array, limit: number): void {
    for (const r of rows) {
      if (r < 0 || r >= limit) throw new Error(`${op}: row ${r} out of range [0, ${limit})`);
    }
  }

  gatherRows(x: Tensor, rows: Int32Array): Tensor {
    this.checkRows("gatherRows", rows, rowsCols(x)[0]);
    const rowsBuf = this.upload(rows);
    const out = this.gatherFrom(x, rowsBuf, rows.length);
    this.release(rowsBuf);
    return out;
  }

  /** gatherRows with the `count` row ids in a device buffer. */
  private gatherFrom(x: Tensor, rows: GPUBuffer, count: number): GpuTensor {
    const [n, h] = rowsCols(x);
    const out = this.newTensor([count, h]); // [selected rows, hidden]
    // Source chunks x output chunks: each dispatch copies the selected rows that lie in
    // its source chunk.
    for (const [s0, srcRows] of this.rowChunks(n, [h * 4])) {
      const srcRange = this.rowRange(t(x).buffer, s0, srcRows, h * 4);
      for (const [i0, chunkCount] of this.rowChunks(count, [h * 4])) {
        const outRange = this.rowRange(out.buffer, i0, chunkCount, h * 4, true);
        this.run({
          kernel: "moe",
          entry: "gather_rows",
          params: [chunkCount, h, s0, srcRows, i0, srcRange.skip, outRange.skip],
          bindings: [{ buffer: rows }, srcRange, outRange],
          workgroups: ceilDiv(chunkCount * h, 64),
        });
      }
    }
    return out;
  }

  scatterAddRows(out: Tensor, y: Tensor, rows: Int32Array, scales: Float32Array): void {
    const [n, h] = rowsCols(out);
    this.checkRows("scatterAddRows", rows, n);
    if (numelOf(y.shape) !== rows.length * h || scales.length !== rows.length) {
      throw new Error(
        `scatterAddRows: y [${y.shape}], ${rows.length} rows, ${scales.length} scales`,
      );
    }
    const rowsBuf = this.upload(rows), scalesBuf = this.upload(scales);
    for (const [d0, dstRows] of this.rowChunks(n, [h * 4])) {
      const dstRange = this.rowRange(t(out).buffer, d0, dstRows, h * 4, true);
      for (const [i0, count] of this.rowChunks(rows.length, [h * 4])) {
        const yRange = this.rowRange(t(y).buffer, i0, count, h * 4);
        this.run({
          kernel: "moe",
          entry: "scatter_add_rows",
          params: [count, h, d0, dstRows, i0, yRange.skip, dstRange.skip],
          bindings: [{ buffer: rowsBuf }, { buffer: scalesBuf }, yRange, dstRange],
          workgroups: ceilDiv(count * h, 64),
        });
      }
    }
    this.release(rowsBuf);
    this.release(scalesBuf);
  }

  // ---- training: backward ops (see BackwardOps in backend.ts for the contract) -------

  uploadTrainableWeight(raw: RawTensor): Weight {
    // The f32 master copy is an ordinary F32 weight (same row chunks), updated in place
    // by adamwStep.
    const values = toFloat32(raw);
    return this.uploadWeight({
      name: raw.name,
      dtype: "F32",
      shape: [...raw.shape],
      bytes: new Uint8Array(values.buffer, values.byteOffset, values.byteLength),
    });
  }

  async readWeight(weight: Weight): Promise<Float32Array> {
    const gw = w(weight);
    const rows = weightRows(weight.shape);
    const rowBytes = (numelOf(weight.shape) / Math.max(rows, 1)) * DTYPE_BYTES[weight.dtype];
    const bytes = new Uint8Array(numelOf(weight.shape) * DTYPE_BYTES[weight.dtype]);
    for (const chunk of gw.chunks) {
      const got = await this.readBytes(chunk.buffer, chunk.buffer.size);
      bytes.set(new Uint8Array(got, 0, chunk.rows * rowBytes), chunk.row0 * rowBytes);
    }
    return toFloat32({ name: weight.name, dtype: weight.dtype, shape: [...weight.shape], bytes });
  }

  zero(x: Tensor): void {
    if (t(x).bytes === 0) return;
    this.recordOutsidePass().clearBuffer(t(x).buffer, 0, t(x).bytes);
  }

  addInPlace(dst: Tensor, src: Tensor): void {
    this.sameSize("addInPlace", dst, src);
    for (const [i0, n] of this.rowChunks(numelOf(dst.shape), [4])) {
      const srcRange = this.rowRange(t(src).buffer, i0, n, 4);
      const dstRange = this.rowRange(t(dst).buffer, i0, n, 4, true);
      this.run({
        kernel: "elementwise_backward",
        entry: "add_in_place",
        params: [n, 1, { f32: 0 }, srcRange.skip, dstRange.skip, 0, 0, 0],
        bindings: [srcRange, dstRange],
        workgroups: ceilDiv(n, 64),
      });
    }
  }

  async sumSquares(tensors: readonly Tensor[]): Promise<number> {
    const BLOCK = 4096; // entries per workgroup, as in the kernel
    // Every chunk's workgroups write their partial sums into one buffer, read once.
    const chunks = tensors.map((x) => this.rowChunks(numelOf(x.shape), [4]));
    const groupsOf = (n: number) => ceilDiv(n, BLOCK);
    const total = chunks.flat().reduce((s, [, n]) => s + groupsOf(n), 0);
    if (total === 0) return 0;
    const partials = this.newTensor([total]);
    let offset = 0;
    tensors.forEach((x, i) => {
      for (const [i0, n] of chunks[i]) {
        const xRange = this.rowRange(t(x).buffer, i0, n, 4);
        this.run({
          kernel: "elementwise_backward",
          entry: "sum_squares",
          params: [n, 1, { f32: 0 }, xRange.skip, 0, 0, offset, 0],
          bindings: [xRange, { buffer: partials.buffer, size: total * 4, write: true }],
          workgroups: groupsOf(n),
        });
        offset += groupsOf(n);
      }
    });
    const values = await this.read(partials);
    this.free(partials);
    // Added in doubles, tensor by tensor.
    let sum = 0;
    offset = 0;
    for (const tensorChunks of chunks) {
      let s = 0;
      for (const [, n] of tensorChunks) {
        for (let g = 0; g < groupsOf(n); g++) s += values[offset + g];
        offset += groupsOf(n);
      }
      sum += s;
    }
    return sum;
  }

  matmulBackward(
    x: Tensor,
    weight: Weight,
    dy: Tensor,
    opts: { needInput: boolean; weightGrad?: Tensor; biasGrad?: Tensor },
  ): Tensor | null {
    const [n, k] = rowsCols(x);
    const [m, k2] = weight.shape;
    if (weight.shape.length !== 2 || k !== k2) {
      throw new Error(
        `matmulBackward: x has ${k} columns but weight "${weight.name}" is [${weight.shape}]`,
      );
    }
    if (numelOf(dy.shape) !== n * m) {
      throw new Error(`matmulBackward: dy [${dy.shape}] != [${n}, ${m}]`);
    }
    if (opts.weightGrad && numelOf(opts.weightGrad.shape) !== m * k) {
      throw new Error(`matmulBackward: weightGrad [${opts.weightGrad.shape}] != [${m}, ${k}]`);
    }
    if (opts.biasGrad && numelOf(opts.biasGrad.shape) !== m) {
      throw new Error(`matmulBackward: biasGrad [${opts.biasGrad.shape}] != [${m}]`);
    }
    const dyBuf = t(dy).buffer;
    const blocked = this.matmulBackwardKernel === "blocked";
    const kernel = blocked ? "matmul_backward_blocked" : "matmul_backward";
    const grid = (cols: number, rows: number): [number, number] =>
      blocked
        ? [ceilDiv(cols, MATMUL_BLOCKED_TILE), ceilDiv(rows, 16 * blockedRowsPerThread(rows))]
        : [ceilDiv(cols, 16), ceilDiv(rows, 16)];
    const tm = (rows: number): Record<string, number> =>
      blocked ? { TM: blockedRowsPerThread(rows) } : {};
    let dx: GpuTensor | null = null;
    if (opts.needInput) {
      // dx [N, K] = sum over weight chunks of dy[:, chunk columns] @ chunk; the first
      // chunk writes, the later ones add.
      dx = this.newTensor([n, k]);
      w(weight).chunks.forEach((chunk, ci) => {
        for (const [r0, rows] of this.rowChunks(n, [k * 4, m * 4])) {
          const dyRange = this.rowRange(dyBuf, r0, rows, m * 4);
          const dxRange = this.rowRange(dx!.buffer, r0, rows, k * 4, true);
          this.run({
            kernel,
            entry: "input_grad",
            constants: { W_DTYPE: DTYPE_CODE[weight.dtype], ...tm(rows) },
            params: [
              rows,
              k,
              chunk.rows,
              m,
              chunk.row0,
              dyRange.skip,
              0,
              dxRange.skip,
              ci > 0 ? 1 : 0,
            ],
            // blocked: the group starts of groupedMatmulBackward (none here)
            bindings: [dyRange, { buffer: chunk.buffer }, dxRange, { buffer: this.emptyBuffer }],
            workgroups: grid(k, rows),
          });
        }
      });
    }
    if (opts.weightGrad) {
      // dW [M, K] += dy^T @ x, in bands of dW rows times row ranges of dy and x.
      const dwBuf = t(opts.weightGrad).buffer;
      for (const [c0, cols] of this.rowChunks(m, [k * 4])) {
        const dwRange = this.rowRange(dwBuf, c0, cols, k * 4, true);
        for (const [r0, rows] of this.rowChunks(n, [k * 4, m * 4])) {
          const dyRange = this.rowRange(dyBuf, r0, rows, m * 4);
          const xRange = this.rowRange(t(x).buffer, r0, rows, k * 4);
          this.run({
            kernel,
            entry: "weight_grad",
            constants: tm(cols),
            params: [rows, k, cols, m, c0, dyRange.skip, xRange.skip, dwRange.skip, 1],
            bindings: [dyRange, xRange, dwRange],
            workgroups: grid(k, cols),
          });
        }
      }
    }
    if (opts.biasGrad) {
      for (const [r0, rows] of this.rowChunks(n, [m * 4])) {
        const dyRange = this.rowRange(dyBuf, r0, rows, m * 4);
        this.run({
          kernel: "matmul_backward",
          entry: "bias_grad",
          params: [rows, k, m, m, 0, dyRange.skip, 0, 0, 1],
          bindings: [dyRange, { buffer: t(opts.biasGrad).buffer, size: m * 4, write: true }],
          workgroups: ceilDiv(m, 64),
        });
      }
    }
    return dx;
  }

  rmsNormBackward(x: Tensor, weight: Weight, dy: Tensor, eps: number, weightGrad?: Tensor): Tensor {
    const [n, d] = rowsCols(x);
    if (numelOf(weight.shape) !== d) {
      throw new Error(
        `rmsNormBackward: rows of ${d} but weight "${weight.name}" is [${weight.shape}]`,
      );
    }
    this.sameSize("rmsNormBackward", x, dy);
    const dx = this.newTensor(x.shape);
    const inv = this.newTensor([n]); // 1 / rms per row, for the weight gradient
    for (const [r0, rows] of this.rowChunks(n, [d * 4, 4])) {
      const xRange = this.rowRange(t(x).buffer, r0, rows, d * 4);
      const dyRange = this.rowRange(t(dy).buffer, r0, rows, d * 4);
      const dxRange = this.rowRange(dx.buffer, r0, rows, d * 4, true);
      const invRange = this.rowRange(inv.buffer, r0, rows, 4, true);
      const params = [
        rows,
        d,
        { f32: eps },
        xRange.skip,
        dyRange.skip,
        dxRange.skip,
        invRange.skip,
      ];
      this.run({
        kernel: "norm_backward",
        entry: "rms_norm_backward",
        constants: { W_DTYPE: DTYPE_CODE[weight.dtype] },
        params,
        bindings: [xRange, dyRange, { buffer: w(weight).chunks[0].buffer }, dxRange, invRange],
        workgroups: rows,
      });
      if (weightGrad) {
        this.run({
          kernel: "norm_backward",
          entry: "rms_norm_weight_grad",
          params,
          bindings: [
            xRange,
            dyRange,
            { ...invRange, write: false },
            { buffer: t(weightGrad).buffer, size: d * 4, write: true },
          ],
          workgroups: ceilDiv(d, 64),
        });
      }
    }
    this.free(inv);
    return dx;
  }

  swigluGateUp(gateUp: Tensor): Tensor {
    const [n, width] = checkGateUp("swigluGateUp", gateUp);
    const out = this.newTensor([n, width]);
    this.gateUpRuns("elementwise", "swiglu_gate_up", gateUp, null, out, n * width);
    return out;
  }

  swigluGateUpBackward(gateUp: Tensor, dy: Tensor): Tensor {
    const [n, width] = checkGateUp("swigluGateUpBackward", gateUp);
    if (numelOf(dy.shape) !== n * width) {
      throw new Error(`swigluGateUpBackward: dy [${dy.shape}] != [${n}, ${width}]`);
    }
    const dGateUp = this.newTensor(gateUp.shape);
    this.gateUpRuns(
      "elementwise_backward",
      "swiglu_gate_up_backward",
      gateUp,
      dy,
      dGateUp,
      n * width,
    );
    return dGateUp;
  }

  /**
   * The swiglu_gate_up kernels over `entries` (R x W values) in chunks of whole runs
   * (GATE_UP_RUN values, 2 GATE_UP_RUN of gateUp): with `dy` (the backward) the output is
   * gateUp-wide, else W-wide.
   */
  private gateUpRuns(
    kernel: "elementwise" | "elementwise_backward",
    entry: string,
    gateUp: Tensor,
    dy: Tensor | null,
    out: GpuTensor,
    entries: number,
  ): void {
    const runBytes = GATE_UP_RUN * 4;
    const runs = entries / GATE_UP_RUN;
    const outRunBytes = dy ? 2 * runBytes : runBytes;
    for (const [q0, q] of this.rowChunks(runs, [2 * runBytes])) {
      const guRange = this.rowRange(t(gateUp).buffer, q0, q, 2 * runBytes);
      const outRange = this.rowRange(out.buffer, q0, q, outRunBytes, true);
      const count = q * GATE_UP_RUN, empty = { buffer: this.emptyBuffer, skip: 0 };
      if (dy) {
        const dyRange = this.rowRange(t(dy).buffer, q0, q, runBytes);
        this.run({
          kernel,
          entry,
          params: [count, 1, { f32: 0 }, guRange.skip, 0, dyRange.skip, outRange.skip, 0],
          bindings: [guRange, empty, dyRange, outRange, empty],
          workgroups: ceilDiv(count, 64),
        });
      } else {
        this.run({
          kernel,
          entry,
          params: [count, 1, { f32: 0 }, guRange.skip, 0, outRange.skip],
          bindings: [guRange, empty, outRange],
          workgroups: ceilDiv(count, 64),
        });
      }
    }
  }

  jsDivergenceRows(p: Tensor, cond: Tensor, eps: number): Tensor {
    this.sameSize("jsDivergenceRows", p, cond);
    const [n, d] = rowsCols(cond);
    const out = this.newTensor([n]);
    const lanes = divergenceLanes(d), rowsPerWorkgroup = 64 / lanes;
    for (const [r0, rows] of this.rowChunks(n, [d * 4])) {
      const pRange = this.rowRange(t(p).buffer, r0, rows, d * 4);
      const condRange = this.rowRange(t(cond).buffer, r0, rows, d * 4);
      const outRange = this.rowRange(out.buffer, r0, rows, 4, true);
      this.run({
        kernel: "divergence",
        entry: "js_rows",
        constants: { LANES: lanes },
        params: [rows, d, { f32: eps }, pRange.skip, condRange.skip, outRange.skip],
        bindings: [pRange, condRange, outRange],
        workgroups: ceilDiv(rows, rowsPerWorkgroup),
      });
    }
    return out;
  }

  /**
   * The bench's f32 peak probe (kernels/roofline.wgsl fma_peak): `threads` threads (a
   * multiple of 256) of 8 vec4 FMA chains `iterations` long, 64 FLOPs a thread and
   * iteration; returns each thread's sum of its chains.
   */
  fmaChains(threads: number, iterations: number): Tensor {
    if (threads % 256 !== 0 || threads < 256 || threads / 256 > MAX_WORKGROUPS_PER_DIM) {
      throw new Error(`fmaChains: ${threads} threads, not 1 to 65,535 workgroups of 256`);
    }
    const out = this.newTensor([threads]);
    this.run({
      kernel: "roofline",
      entry: "fma_peak",
      params: [threads, iterations],
      bindings: [{ buffer: out.buffer, write: true }],
      workgroups: threads / 256,
    });
    return out;
  }

  groupedMatmulBackward(dy: Tensor, stack: Weight, groupRows: Int32Array): Tensor {
    const [r, m] = rowsCols(dy);
    const k = stack.shape[2];
    checkGrouped(stack, m, groupRows, r, "groupedMatmulBackward", 1);
    const startBuf = this.upload(groupStarts(groupRows));
    const dx = this.newTensor([r, k]);
    // Tiles of up to 128 rows (64 where no group has more than 64), one group's rows each.
    const tm = blockedRowsPerThread(Math.max(0, ...groupRows)), tileRows = 16 * tm;
    const dispatches = this.groupedDispatches(stack, r, [k * 4, m * 4], tileRows);
    for (const { chunk, r0, rows, capacity, tail } of dispatches) {
      const dyRange = this.rowRange(t(dy).buffer, r0, rows, m * 4);
      const dxRange = this.rowRange(dx.buffer, r0, rows, k * 4, true);
      this.run({
        kernel: "matmul_backward_blocked",
        entry: "input_grad",
        constants: { W_DTYPE: DTYPE_CODE[stack.dtype], TM: tm, GROUPED: 1 },
        params: [rows, k, 0, m, 0, dyRange.skip, 0, dxRange.skip, 0, ...tail],
        bindings: [dyRange, { buffer: chunk.buffer }, dxRange, { buffer: startBuf }],
        workgroups: [ceilDiv(k, MATMUL_BLOCKED_TILE), capacity],
      });
    }
    this.release(startBuf);
    return dx;
  }

  swigluBackward(gate: Tensor, up: Tensor, dy: Tensor): { dGate: Tensor; dUp: Tensor } {
    this.sameSize("swigluBackward", gate, up);
    this.sameSize("swigluBackward", gate, dy);
    const dGate = this.newTensor(gate.shape), dUp = this.newTensor(gate.shape);
    for (const [i0, n] of this.rowChunks(numelOf(gate.shape), [4])) {
      const ranges = [
        this.rowRange(t(gate).buffer, i0, n, 4),
        this.rowRange(t(up).buffer, i0, n, 4),
        this.rowRange(t(dy).buffer, i0, n, 4),
        this.rowRange(dGate.buffer, i0, n, 4, true),
        this.rowRange(dUp.buffer, i0, n, 4, true),
      ];
      this.run({
        kernel: "elementwise_backward",
        entry: "swiglu_backward",
        params: [n, 1, { f32: 0 }, ...ranges.map((r) => r.skip)],
        bindings: ranges,
        workgroups: ceilDiv(n, 64),
      });
    }
    return { dGate, dUp };
  }

  clampBackward(x: Tensor, dy: Tensor, limit: number): Tensor {
    this.sameSize("clampBackward", x, dy);
    const dx = this.newTensor(x.shape);
    for (const [i0, n] of this.rowChunks(numelOf(x.shape), [4])) {
      const xRange = this.rowRange(t(x).buffer, i0, n, 4);
      const dyRange = this.rowRange(t(dy).buffer, i0, n, 4);
      const dxRange = this.rowRange(dx.buffer, i0, n, 4, true);
      this.run({
        kernel: "elementwise_backward",
        entry: "clamp_backward",
        params: [n, 1, { f32: limit }, xRange.skip, dyRange.skip, 0, dxRange.skip, 0],
        bindings: [xRange, dyRange, dxRange],
        workgroups: ceilDiv(n, 64),
      });
    }
    return dx;
  }

  ropeBackward(
    dy: Tensor,
    positions: Int32Array,
    heads: number,
    headDim: number,
    theta: number,
    linearFactor: number,
  ): Tensor {
    // The rotation is orthogonal: its transpose is the rotation by the negated angle.
    return this.rotate(dy, positions, heads, headDim, theta, linearFactor, -1);
  }

  attentionBackward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dOut: Tensor,
    s: AttentionShape,
    saved?: { out: Tensor; stats: Tensor | null },
  ): { dq: Tensor; dk: Tensor; dv: Tensor } {
    const { batch, qLen, kvLen, heads, kvHeads, headDim } = s;
    const qw = heads * headDim, kw = kvHeads * headDim;
    checkAttentionBackward(q, k, v, dOut, s);
    const kernel = this.checkedAttentionKernel("attentionBackward", s);
    const tiling = kernel === "tiled" ? attentionBackwardTiling(s) : null;
    const dq = this.newTensor([batch * qLen, qw]); // [B*qLen, heads*hd]
    const dk = this.newTensor([batch * kvLen, kw]); // [B*kvLen, kvHeads*hd]
    const dv = this.newTensor([batch * kvLen, kw]);
    // Chunks are whole sequences, as in the forward. Per query row and head the naive
    // kernel keeps (m, l, D), the tiled one (lse, D): from the forward where it saved lse
    // (attentionSaving), the query pass then adding D.
    const savedStats = tiling && saved?.stats ? saved.stats : null;
    if (savedStats && numelOf(savedStats.shape) !== batch * qLen * heads * 2) {
      throw new Error(
        `attentionBackward: saved statistics [${savedStats.shape}], want [${
          batch * qLen * heads
        }, 2]`,
      );
    }
    const qBytes = qLen * qw * 4, kvBytes = kvLen * kw * 4;
    const statBytes = heads * qLen * (tiling ? 8 : 12);
    for (const [b0, seqs] of this.rowChunks(batch, [qBytes, kvBytes, statBytes])) {
      const qRange = this.rowRange(t(q).buffer, b0, seqs, qBytes);
      const kRange = this.rowRange(t(k).buffer, b0, seqs, kvBytes);
      const vRange = this.rowRange(t(v).buffer, b0, seqs, kvBytes);
      const doRange = this.rowRange(t(dOut).buffer, b0, seqs, qBytes);
      const dqRange = this.rowRange(dq.buffer, b0, seqs, qBytes, true);
      const dkRange = this.rowRange(dk.buffer, b0, seqs, kvBytes, true);
      const dvRange = this.rowRange(dv.buffer, b0, seqs, kvBytes, true);
      const stats = savedStats
        ? this.rowRange(t(savedStats).buffer, b0, seqs, statBytes, true)
        : { buffer: this.acquire(seqs * statBytes, true), size: seqs * statBytes, skip: 0 };
      const outRange = savedStats
        ? this.rowRange(t(saved!.out).buffer, b0, seqs, qBytes)
        : { buffer: this.emptyBuffer, skip: 0 };
      const ranges = [qRange, kRange, vRange, doRange, dqRange, dkRange, dvRange];
      const params = [...attentionParams(seqs, s, ranges), stats.skip, outRange.skip];
      const inputs = [qRange, kRange, vRange, doRange];
      const queryPass = [...inputs, { ...stats, write: true }, dqRange];
      const keyPass = [...inputs, { ...stats, write: false }, dkRange, dvRange];
      if (tiling) {
        const constants = { HEAD_DIM: headDim, LANES: tiling.lanes };
        this.run({
          kernel: "attention_backward_tiled",
          entry: "attention_backward_query",
          constants: { ...constants, TILE: tiling.keys, SAVED_STATS: savedStats ? 1 : 0 },
          params,
          bindings: [...queryPass, outRange],
          workgroups: seqs * kvHeads * tiling.queryBlocks,
        });
        this.run({
          kernel: "attention_backward_tiled",
          entry: "attention_backward_kv",
          constants: { ...constants, TILE: tiling.queryRows },
          params,
          bindings: keyPass,
          workgroups: seqs * kvHeads * tiling.keyBlocks,
        });
      } else {
        this.run({
          kernel: "attention_backward",
          entry: "attention_backward_query",
          params,
          bindings: queryPass,
          workgroups: ceilDiv(seqs * heads * qLen, 64),
        });
        this.run({
          kernel: "attention_backward",
          entry: "attention_backward_kv",
          params,
          bindings: keyPass,
          workgroups: ceilDiv(seqs * kvLen * kvHeads, 64),
        });
      }
      if (!savedStats) this.release(stats.buffer);
    }
    return { dq, dk, dv };
  }

  embeddingBackward(ids: Int32Array, dy: Tensor, tableGrad: Tensor): void {
    const [vocab, h] = rowsCols(tableGrad);
    this.checkRows("embeddingBackward", ids, vocab);
    if (numelOf(dy.shape) !== ids.length * h) {
      throw new Error(`embeddingBackward: dy [${dy.shape}] for ${ids.length} ids of width ${h}`);
    }
    if (ids.length === 0) return;
    // Group the positions by id (ascending id, positions in order): CSR arrays.
    const order = Int32Array.from(ids.keys()).sort((a, b) => ids[a] - ids[b] || a - b);
    const distinct: number[] = [], starts: number[] = [];
    order.forEach((pos, s) => {
      if (s === 0 || ids[pos] !== ids[order[s - 1]]) distinct.push(ids[pos]), starts.push(s);
    });
    starts.push(order.length);
    const idsBuf = this.upload(Int32Array.from(distinct));
    const startsBuf = this.upload(Uint32Array.from(starts));
    const posBuf = this.upload(order);
    let u0 = 0; // first distinct id in the current band of table rows
    for (const [g0, rowsInBand] of this.rowChunks(vocab, [h * 4])) {
      let u1 = u0;
      while (u1 < distinct.length && distinct[u1] < g0 + rowsInBand) u1++;
      if (u1 > u0) {
        const gRange = this.rowRange(t(tableGrad).buffer, g0, rowsInBand, h * 4, true);
        for (const [d0, dyRows] of this.rowChunks(ids.length, [h * 4])) {
          const dyRange = this.rowRange(t(dy).buffer, d0, dyRows, h * 4);
          this.run({
            kernel: "moe_backward",
            entry: "embedding_backward",
            params: [u1 - u0, h, g0, u0, d0, dyRows, dyRange.skip, gRange.skip],
            bindings: [
              { buffer: idsBuf },
              { buffer: startsBuf },
              { buffer: posBuf },
              dyRange,
              gRange,
            ],
            workgroups: ceilDiv((u1 - u0) * h, 64),
          });
        }
      }
      u0 = u1;
    }
    this.release(idsBuf);
    this.release(startsBuf);
    this.release(posBuf);
  }

  scatterAddRowsBackward(
    dOut: Tensor,
    y: Tensor,
    rows: Int32Array,
    scales: Float32Array,
  ): { dy: Tensor; dScales: Tensor } {
    const [n, h] = rowsCols(dOut);
    this.checkRows("scatterAddRowsBackward", rows, n);
    if (numelOf(y.shape) !== rows.length * h || scales.length !== rows.length) {
      throw new Error(
        `scatterAddRowsBackward: y [${y.shape}], ${rows.length} rows, ${scales.length} scales`,
      );
    }
    const dy = this.newTensor([rows.length, h]); // [rows, H]
    const dScales = this.newTensor([rows.length]);
    const rowsBuf = this.upload(rows), scalesBuf = this.upload(scales);
    // dOut chunks x selected-row chunks, as gatherRows.
    for (const [s0, srcRows] of this.rowChunks(n, [h * 4])) {
      const srcRange = this.rowRange(t(dOut).buffer, s0, srcRows, h * 4);
      for (const [i0, count] of this.rowChunks(rows.length, [h * 4])) {
        const dyRange = this.rowRange(dy.buffer, i0, count, h * 4, true);
        this.run({
          kernel: "moe_backward",
          entry: "scatter_rows_backward_dy",
          params: [count, h, s0, srcRows, i0, srcRange.skip, dyRange.skip],
          bindings: [{ buffer: rowsBuf }, { buffer: scalesBuf }, srcRange, dyRange],
          workgroups: ceilDiv(count * h, 64),
        });
        const yRange = this.rowRange(t(y).buffer, i0, count, h * 4);
        this.run({
          kernel: "moe_backward",
          entry: "scatter_rows_backward_scales",
          params: [count, h, s0, srcRows, i0, srcRange.skip, yRange.skip],
          bindings: [
            { buffer: rowsBuf },
            yRange,
            srcRange,
            { buffer: dScales.buffer, size: rows.length * 4, write: true },
          ],
          workgroups: ceilDiv(count, 64),
        });
      }
    }
    this.release(rowsBuf);
    this.release(scalesBuf);
    return { dy, dScales };
  }

  routeTopKBackward(
    logits: Tensor,
    routing: Routing,
    dWeights: Float32Array,
    normalize: boolean,
    eps: number,
  ): Tensor {
    const [n, e] = rowsCols(logits);
    const dLogits = this.newTensor(logits.shape); // [N, E]
    if (n === 0) return dLogits;
    const k = routing.indices.length / n;
    if (!Number.isInteger(k) || dWeights.length !== n * k) {
      throw new Error(
        `routeTopKBackward: ${routing.indices.length} indices, ${dWeights.length} dWeights, ${n} rows`,
      );
    }
    this.checkRows("routeTopKBackward", routing.indices, e);
    for (const [r0, rows] of this.rowChunks(n, [e * 4, k * 4])) {
      const idxBuf = this.upload(routing.indices.subarray(r0 * k, (r0 + rows) * k));
      const dwBuf = this.upload(dWeights.subarray(r0 * k, (r0 + rows) * k));
      const inRange = this.rowRange(t(logits).buffer, r0, rows, e * 4);
      const outRange = this.rowRange(dLogits.buffer, r0, rows, e * 4, true);
      this.run({
        kernel: "moe_backward",
        entry: "route_topk_backward",
        params: [rows, e, k, normalize ? 1 : 0, { f32: eps }, inRange.skip, outRange.skip],
        bindings: [inRange, { buffer: idxBuf }, { buffer: dwBuf }, outRange],
        workgroups: ceilDiv(rows, 64),
      });
      this.release(idxBuf);
      this.release(dwBuf);
    }
    return dLogits;
  }

  sigmoidScaleRowsBackward(y: Tensor, g: Tensor, dOut: Tensor): { dy: Tensor; dg: Tensor } {
    const [n, d] = rowsCols(y);
    this.sameSize("sigmoidScaleRowsBackward", y, dOut);
    // dy = dOut * sigmoid(g): the forward op applied to dOut.
    const dy = this.sigmoidScaleRows(dOut, g);
    const dg = this.newTensor(g.shape); // [N, 1]
    for (const [r0, rows] of this.rowChunks(n, [d * 4, 4])) {
      const yRange = this.rowRange(t(y).buffer, r0, rows, d * 4);
      const gRange = this.rowRange(t(g).buffer, r0, rows, 4);
      const doRange = this.rowRange(t(dOut).buffer, r0, rows, d * 4);
      const dgRange = this.rowRange(dg.buffer, r0, rows, 4, true);
      this.run({
        kernel: "elementwise_backward",
        entry: "sigmoid_gate_backward",
        params: [rows, d, { f32: 0 }, yRange.skip, gRange.skip, doRange.skip, dgRange.skip, 0],
        bindings: [yRange, gRange, doRange, dgRange],
        workgroups: ceilDiv(rows, 64),
      });
    }
    return { dy, dg };
  }

  async crossEntropy(
    logits: Tensor,
    targets: Int32Array,
    ignoreIndex: number,
    gradScale?: number,
  ): Promise<{ loss: number; count: number; dLogits: Tensor }> {
    const [n, vocab] = rowsCols(logits);
    if (targets.length !== n) throw new Error(`crossEntropy: ${targets.length} targets, ${n} rows`);
    let count = 0;
    for (const target of targets) {
      if (target === ignoreIndex) continue;
      if (target < 0 || target >= vocab) throw new Error(`target ${target} out of range`);
      count++;
    }
    const g = gradScale ?? (count > 0 ? 1 / count : 0);
    const dLogits = this.newTensor(logits.shape); // [N, V]
    const losses = this.newTensor([n]); // per row, 0 on ignored rows
    const targetsBuf = this.upload(targets);
    for (const [r0, rows] of this.rowChunks(n, [vocab * 4])) {
      const inRange = this.rowRange(t(logits).buffer, r0, rows, vocab * 4);
      const outRange = this.rowRange(dLogits.buffer, r0, rows, vocab * 4, true);
      this.run({
        kernel: "loss",
        entry: "cross_entropy",
        params: [rows, vocab, { f32: g }, ignoreIndex >>> 0, r0, inRange.skip, outRange.skip],
        bindings: [inRange, { buffer: targetsBuf }, outRange, {
          buffer: losses.buffer,
          size: n * 4,
          write: true,
        }],
        workgroups: rows,
      });
    }
    this.release(targetsBuf);
    let sum = 0;
    if (n > 0) { for (const l of await this.read(losses)) sum += l; }
    this.free(losses);
    return { loss: count > 0 ? sum / count : 0, count, dLogits };
  }

  adamwStep(param: Weight, grad: Tensor, m: Tensor, v: Tensor, hp: AdamWHyper): void {
    const numel = numelOf(param.shape);
    if (param.dtype !== "F32" || numelOf(grad.shape) !== numel) {
      throw new Error(`adamwStep: "${param.name}" is not a trainable weight of grad's size`);
    }
    this.sameSize("adamwStep", grad, m);
    this.sameSize("adamwStep", grad, v);
    const rowsTotal = weightRows(param.shape);
    const rowElems = numel / Math.max(rowsTotal, 1);
    const bc1 = 1 - hp.beta1 ** hp.step, bc2 = 1 - hp.beta2 ** hp.step;
    // Each weight chunk is its own buffer; grad, m and v are bound at the same entries.
    for (const chunk of w(param).chunks) {
      const base = chunk.row0 * rowElems;
      for (const [e0, n] of this.rowChunks(chunk.rows * rowElems, [4])) {
        const pRange = this.rowRange(chunk.buffer, e0, n, 4, true);
        const gRange = this.rowRange(t(grad).buffer, base + e0, n, 4);
        const mRange = this.rowRange(t(m).buffer, base + e0, n, 4, true);
        const vRange = this.rowRange(t(v).buffer, base + e0, n, 4, true);
        this.run({
          kernel: "adamw",
          entry: "adamw",
          params: [
            n,
            { f32: hp.lr },
            { f32: hp.beta1 },
            { f32: hp.beta2 },
            { f32: hp.eps },
            { f32: hp.weightDecay },
            { f32: bc1 },
            { f32: bc2 },
            { f32: hp.gradScale },
            pRange.skip,
            gRange.skip,
            mRange.skip,
            vRange.skip,
          ],
          bindings: [pRange, gRange, mRange, vRange],
          workgroups: ceilDiv(n, 64),
        });
      }
    }
  }

  /** Release every pooled buffer and the device. The backend is unusable afterwards. */
  destroy(): void {
    this.flush();
    for (const list of this.shared.pool.values()) for (const b of list) b.destroy();
    this.shared.pool.clear();
    this.shared.pooledBytes = 0;
    this.device.destroy();
  }
}
