// The device side every op shares: the buffer pool, pipelines and bind groups, and the batch of
// recorded dispatches submitted together (see mod.ts). The ops extend this class, one file per
// kernel family.

import type { RawTensor } from "../../io/safetensors.ts";
import { checkReshape, numelOf, type Tensor, type Weight } from "../backend.ts";
import { kernelCode, type KernelFile } from "./kernels.ts";
import {
  ATTENTION_KERNELS,
  type AttentionKernel,
  MATMUL_BACKWARD_KERNELS,
  MATMUL_KERNELS,
  type MatmulBackwardKernel,
  type MatmulKernel,
  type WebGpuOptions,
} from "./options.ts";
import {
  ceilDiv,
  DTYPE_BYTES,
  GATE_UP_BLOCK,
  GpuTensor,
  GpuWeight,
  t,
  w,
  type WeightChunk,
  weightRows,
} from "./tensors.ts";

/** A storage binding: a whole buffer or a byte range of it. */
export interface Binding {
  buffer: GPUBuffer;
  offset?: number;
  size?: number;
  /** The kernel writes it (read_write storage). */
  write?: boolean;
}

export interface Dispatch {
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
export interface SharedState {
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

// The most Params a kernel has: attention_backward_common.wgsl's 17 u32s, padded to 16 bytes.
const UNIFORM_BYTES = 80;
// Dispatches per submitted batch: their uniforms share one buffer, one slot each.
const BATCH_DISPATCHES = 1024;
// Bind groups kept for reuse (a decode step of the default model uses 81); the cache is
// dropped whole when full, so groups of buffers long gone do not pile up.
const BIND_GROUP_CACHE = 4096;
// Buffers freed while a batch is pending are held back; past this many bytes, submit.
const RETIRING_BYTES = 256 * 1024 * 1024;
export const MAX_WORKGROUPS_PER_DIM = 65535;
// Freed buffers kept for reuse, at most this many bytes in all; the rest are destroyed.
const POOL_BYTES = 256 * 1024 * 1024;

export class WebGpuCore {
  readonly maxBindingBytes: number;
  readonly matmulKernel: MatmulKernel | "auto";
  readonly matmulBackwardKernel: MatmulBackwardKernel;
  readonly attentionKernel: AttentionKernel | "auto";
  private readonly offsetAlign: number;
  protected readonly emptyBuffer: GPUBuffer;
  private firstError: string | null = null;
  private readonly uniformSlot: number;
  /** Pools, caches and the pending batch, shared by every backend on this device. */
  protected readonly shared: SharedState;
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
    protected readonly opts: WebGpuOptions = {},
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
  protected acquire(bytes: number, gpuWritten = false): GPUBuffer {
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

  protected release(buffer: GPUBuffer): void {
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
  protected upload(data: ArrayBufferView): GPUBuffer {
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
  protected newTensor(shape: readonly number[]): GpuTensor {
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
  protected async readBytes(buffer: GPUBuffer, bytes: number): Promise<ArrayBuffer> {
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

  reshape(x: Tensor, shape: readonly number[]): Tensor {
    checkReshape(x, shape);
    return new GpuTensor(t(x).buffer, [...shape]);
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
      const code = kernelCode(d.kernel);
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
  protected run(d: Dispatch): void {
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
  protected recordOutsidePass(): GPUCommandEncoder {
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
  protected rowChunks(rows: number, bytesPerRow: number[]): [number, number][] {
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
  protected rowRange(
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

  /** Release every pooled buffer and the device. The backend is unusable afterwards. */
  destroy(): void {
    this.flush();
    for (const list of this.shared.pool.values()) for (const b of list) b.destroy();
    this.shared.pool.clear();
    this.shared.pooledBytes = 0;
    this.device.destroy();
  }
}
