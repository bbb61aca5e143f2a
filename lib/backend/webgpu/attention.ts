// Attention, forward and backward: RoPE and the q/k/v split (into the KV cache), the naive,
// tiled and flash-decoding kernels, and how each covers a shape (kernels/rope.wgsl,
// kernels/attention*.wgsl).

import {
  type AttentionShape,
  checkAttentionBackward,
  checkAttentionShape,
  checkSplitQkv,
  kvCacheRows,
  type KvRows,
  numelOf,
  type RopeSpec,
  rowsCols,
  type Tensor,
} from "../backend.ts";
import type { Binding } from "./core.ts";
import { WebGpuMatmul } from "./matmul.ts";
import type { AttentionKernel } from "./options.ts";
import { ceilDiv, type GpuTensor, t } from "./tensors.ts";

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

export class WebGpuAttention extends WebGpuMatmul {
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
}
