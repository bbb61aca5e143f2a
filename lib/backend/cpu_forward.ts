// The CPU backend's memory and forward ops, as the class CpuForward; CpuBackend (cpu.ts, where
// the backend is described) extends it with the training ops.

import { totalmem } from "node:os";
import { exp } from "./exp.ts";
import { coreThreads, defaultThreads, RowThreads, sharedFloats } from "./cpu_rows.ts";
import { type RawTensor, toFloat32 } from "../io/safetensors.ts";
import { type Blas, loadBlas } from "./blas.ts";
import { loadGemm, wasmBlas } from "./wasm_gemm.ts";
import {
  argmaxRow,
  type AttentionShape,
  checkAddRmsNorm,
  checkAttentionShape,
  checkCombine,
  checkGrouped,
  checkMatmulSwiglu,
  checkReshape,
  checkRoutedExperts,
  checkSplitQkv,
  expertPlan,
  type ExpertStacks,
  idsOf,
  kvCacheRows,
  type KvRows,
  numelOf,
  type RopeSpec,
  type RouteSpec,
  type Routing,
  rowsCols,
  type Tensor,
  type Weight,
  type WeightDType,
} from "./backend.ts";

// Scores of this many f32 entries (16 MiB) are computed before their softmax: many
// (sequence, head) pairs per thread hand-over, and bounded memory at long contexts.
const ATTENTION_SCORES_CHUNK = 1 << 22;

// Most bytes of freed arrays kept for reuse by default: 1 GiB, at most 1/16 of the memory.
// A training step's tapes free about 400 MiB; with 256 MiB it still faulted in 320 MiB a
// step and ran 10% slower.
const POOL_BYTES = Math.min(2 ** 30, Math.floor(totalmem() / 16));

/**
 * The BLAS attention's (sequence, head) pairs: how many share one scores buffer (up to
 * ATTENTION_SCORES_CHUNK entries, at least one), and where a pair's head starts in the
 * q-side rows (q, o, dO, dq) and the k-side rows (k, v, dk, dv; `stride` rows a sequence).
 */
export function attentionPairs(s: AttentionShape, stride: number) {
  const { batch, qLen, kvLen, heads, kvHeads, headDim } = s;
  const qw = heads * headDim, kw = kvHeads * headDim, group = heads / kvHeads;
  const block = qLen * kvLen, pairs = batch * heads;
  const chunk = Math.max(1, Math.min(pairs, Math.floor(ATTENTION_SCORES_CHUNK / block)));
  const offsets = (pair: number) => {
    const b = Math.floor(pair / heads), h = pair % heads, kh = Math.floor(h / group);
    return { q: b * qLen * qw + h * headDim, k: b * stride * kw + kh * headDim };
  };
  return { chunk, block, pairs, offsets };
}

export class CpuTensor implements Tensor {
  constructor(readonly data: Float32Array, readonly shape: readonly number[]) {
    if (data.length !== numelOf(shape)) {
      throw new Error(
        `tensor data has ${data.length} entries, shape [${shape}] needs ${numelOf(shape)}`,
      );
    }
  }
}

export class CpuWeight implements Weight {
  constructor(
    readonly name: string,
    readonly data: Float32Array,
    readonly shape: readonly number[],
    readonly dtype: WeightDType,
  ) {}
}

export const t = (x: Tensor) => x as CpuTensor;
export const w = (x: Weight) => x as CpuWeight;

export interface CpuOptions {
  /** Plain loops only, no BLAS, one thread: the oracle the fast paths are tested against. */
  reference?: boolean;
  /**
   * Threads for the elementwise passes (BLAS has its own); default: defaultThreads (one a
   * core, one on 2 cores or fewer). Without BLAS, also the WebAssembly matmul's threads
   * (default: one a core, 2 cores included). Results are the same for any count.
   */
  threads?: number;
  /** Most bytes of freed arrays kept for reuse (default POOL_BYTES); 0 keeps none. */
  poolBytes?: number;
  /**
   * Matmul by the WebAssembly SIMD GEMM (wasm_gemm.ts) even where BLAS is found, as with
   * MOE_CONDENSE_BLAS=off (tests, comparisons).
   */
  wasmMatmul?: boolean;
  /** Called once, at the first product, where matmul runs in WebAssembly (a job's notice). */
  onWasmMatmul?: () => void;
}

export class CpuForward {
  readonly name = "cpu" as const;
  readonly description: string;
  readonly f32Weights = true;
  protected blas: Blas | null;
  protected rows: RowThreads;
  // Tensors and weights in shared memory, so worker threads can read and write them in place.
  protected shared: boolean;
  // SwiGLU, softmax, the norms, RoPE and combine in f32 WebAssembly SIMD lanes (within a
  // few ulps of the doubles); the reference keeps its JS doubles.
  protected simd: boolean;

  constructor(opts: CpuOptions = {}) {
    this.simd = !opts.reference;
    this.poolBytes = opts.poolBytes ?? POOL_BYTES;
    this.rows = RowThreads.shared(opts.threads ?? (opts.reference ? 1 : defaultThreads()));
    this.blas = opts.reference || opts.wasmMatmul ? null : loadBlas();
    let gemmThreads = 1;
    if (!this.blas && !opts.reference && loadGemm()) {
      // Without BLAS's threads beside it, the matmul gains from every core, 2 of 2 included
      // (docs/foundation.md); a thread count asked for is kept.
      const asked = opts.threads ?? (Deno.env.get("MOE_CONDENSE_THREADS") && defaultThreads());
      gemmThreads = asked || coreThreads();
      this.blas = wasmBlas(RowThreads.shared(gemmThreads), undefined, opts.onWasmMatmul);
    }
    this.shared = this.rows.threads > 1 || gemmThreads > 1;
    this.description = (this.blas
      ? `CPU f32, matmul by ${this.blas.library}` +
        (this.blas.kernels ? ` (${this.blas.kernels} kernels)` : "")
      : "CPU f32 reference loops") +
      (this.rows.threads > 1 ? `, ${this.rows.threads} threads` : "");
  }

  // Freed outputs and scratch kept for reuse, by length. The first write to each page of a
  // fresh array costs a kernel page fault: 2.4 ms for 4 MiB here, 12x the fill that reuse
  // needs, and the forward allocated 690 MiB (a third of its time went to faults).
  private pool = new Map<number, Float32Array[]>(); // by length, the last freed last
  private pooledOrder = new Set<Float32Array>(); // every pooled array, the first freed first
  private pooledBytes = 0;
  private poolBytes: number;
  // Arrays this backend made and still owns: read() hands an array to its caller for good.
  private recyclable = new WeakSet<Float32Array>();

  /** A zeroed f32 array, in shared memory when worker threads may write it. */
  protected floats(n: number, zeroed = true): Float32Array {
    let out = this.pool.get(n)?.pop();
    if (out) {
      this.pooledOrder.delete(out);
      this.pooledBytes -= out.byteLength;
      if (zeroed) out.fill(0);
    } else out = this.shared ? sharedFloats(n) : new Float32Array(n);
    this.recyclable.add(out);
    return out;
  }

  /** floats() without the zero fill, for an output whose every entry the op writes. */
  protected outputFloats(n: number): Float32Array {
    return this.floats(n, false);
  }

  /** Returns an array from floats() to the pool; anything else is left to the GC. */
  protected recycle(data: Float32Array): void {
    if (!this.recyclable.delete(data)) return; // not ours, read, or already freed
    if (data.byteLength > this.poolBytes) return;
    // The arrays freed longest ago make room: where sizes change (an evaluation's batches
    // of other lengths), each forward still reuses its own arrays, layer after layer.
    for (const old of this.pooledOrder) {
      if (this.pooledBytes + data.byteLength <= this.poolBytes) break;
      const list = this.pool.get(old.length)!;
      list.splice(list.indexOf(old), 1);
      this.pooledOrder.delete(old);
      this.pooledBytes -= old.byteLength;
    }
    const list = this.pool.get(data.length) ?? [];
    list.push(data);
    this.pool.set(data.length, list);
    this.pooledOrder.add(data);
    this.pooledBytes += data.byteLength;
  }

  uploadWeight(raw: RawTensor): Weight {
    if (raw.dtype !== "F32" && raw.dtype !== "BF16" && raw.dtype !== "F16") {
      throw new Error(`weight "${raw.name}": dtype ${raw.dtype} is not a float type`);
    }
    // Aligned f32 bytes are used in place (a checkpoint read or a stack is fresh memory):
    // a copy would double the peak while a layer loads.
    let values = raw.dtype === "F32" && raw.bytes.byteOffset % 4 === 0
      ? new Float32Array(raw.bytes.buffer, raw.bytes.byteOffset, numelOf(raw.shape))
      : toFloat32(raw);
    // Threads would otherwise be handed a shared copy at every use.
    if (this.shared && !(values.buffer instanceof SharedArrayBuffer)) {
      const copy = sharedFloats(values.length);
      copy.set(values);
      values = copy;
    }
    return new CpuWeight(raw.name, values, raw.shape, raw.dtype);
  }
  freeWeight(_w: Weight): void {}
  tensor(data: Float32Array, shape: readonly number[]): Tensor {
    return new CpuTensor(data, [...shape]);
  }
  // Reading hands the array itself to the caller (no copy), so it is never reused.
  read(x: Tensor): Promise<Float32Array> {
    this.recyclable.delete(t(x).data);
    return Promise.resolve(t(x).data);
  }
  readAll(xs: readonly Tensor[]): Promise<Float32Array[]> {
    for (const x of xs) this.recyclable.delete(t(x).data);
    return Promise.resolve(xs.map((x) => t(x).data));
  }
  free(x: Tensor): void {
    this.recycle(t(x).data);
  }
  reshape(x: Tensor, shape: readonly number[]): Tensor {
    checkReshape(x, shape);
    return new CpuTensor(t(x).data, [...shape]);
  }

  embedding(table: Weight, tokens: Int32Array | Tensor): Tensor {
    const [vocab, h] = table.shape;
    const ids = tokens instanceof Int32Array ? tokens : idsOf(t(tokens).data);
    const out = this.floats(ids.length * h);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (id < 0 || id >= vocab) throw new Error(`token id ${id} out of range [0, ${vocab})`);
      out.set(w(table).data.subarray(id * h, (id + 1) * h), i * h);
    }
    return new CpuTensor(out, [ids.length, h]);
  }

  argmaxRows(x: Tensor): Tensor {
    const [n, cols] = rowsCols(x);
    if (cols === 0) throw new Error("argmaxRows: rows of no columns");
    const out = new CpuTensor(this.floats(n), [n]), ids = idsOf(out.data);
    for (let r = 0; r < n; r++) ids[r] = argmaxRow(t(x).data, r, cols);
    return out;
  }

  rmsNorm(x: Tensor, weight: Weight, eps: number): Tensor {
    const [n, d] = rowsCols(x);
    const out = this.outputFloats(n * d);
    const args = { x: t(x).data, weight: w(weight).data, out, width: d, eps, simd: this.simd };
    this.rows.run("rmsNorm", args, n, d, [out]);
    return new CpuTensor(out, x.shape);
  }

  addRmsNorm(a: Tensor, b: Tensor, weight: Weight, eps: number): { sum: Tensor; normed: Tensor } {
    checkAddRmsNorm(a, b, weight);
    const [n, d] = rowsCols(a);
    const sum = this.outputFloats(n * d), normed = this.outputFloats(n * d);
    // Normalises the f32 sums, as add then rmsNorm would.
    const args = { a: t(a).data, b: t(b).data, weight: w(weight).data, sum, out: normed };
    this.rows.run("addRmsNorm", { ...args, width: d, eps, simd: this.simd }, n, d, [sum, normed]);
    return { sum: new CpuTensor(sum, a.shape), normed: new CpuTensor(normed, a.shape) };
  }

  matmul(x: Tensor, weight: Weight, bias?: Weight): Tensor {
    const [n, k] = rowsCols(x);
    const [m, k2] = weight.shape;
    if (k !== k2) {
      throw new Error(
        `matmul: x has ${k} columns but weight "${weight.name}" is [${weight.shape}]`,
      );
    }
    const xs = t(x).data, ws = w(weight).data, bs = bias ? w(bias).data : null;
    const out = this.outputFloats(n * m);
    if (this.blas && n > 0) {
      this.blas.matmulTransB(xs, ws, out, n, k, m);
      if (bs) { for (let r = 0; r < n; r++) for (let c = 0; c < m; c++) out[r * m + c] += bs[c]; }
      return new CpuTensor(out, [n, m]);
    }
    for (let r = 0; r < n; r++) {
      const xo = r * k;
      for (let c = 0; c < m; c++) {
        const wo = c * k;
        let s = 0;
        for (let i = 0; i < k; i++) s += xs[xo + i] * ws[wo + i];
        out[r * m + c] = bs ? s + bs[c] : s;
      }
    }
    return new CpuTensor(out, [n, m]);
  }

  groupedMatmul(x: Tensor, stack: Weight, groupRows: Int32Array): Tensor {
    const [r, k] = rowsCols(x);
    const [g, m] = stack.shape;
    checkGrouped(stack, k, groupRows, r);
    const out = this.outputFloats(r * m), xs = t(x).data, ws = w(stack).data;
    for (let e = 0, r0 = 0; e < g; r0 += groupRows[e++]) {
      const n = groupRows[e];
      if (n === 0) continue;
      const xe = xs.subarray(r0 * k, (r0 + n) * k), we = ws.subarray(e * m * k, (e + 1) * m * k);
      // BLAS writes each group's rows in place; the plain loops return them to copy.
      if (this.blas) this.blas.matmulTransB(xe, we, out.subarray(r0 * m, (r0 + n) * m), n, k, m);
      else {
        const y = this.matmul(
          new CpuTensor(xe, [n, k]),
          new CpuWeight(stack.name, we, [m, k], "F32"),
        );
        out.set(t(y).data, r0 * m);
      }
    }
    return new CpuTensor(out, [r, m]);
  }

  matmulSwiglu(x: Tensor, gateUp: Weight): Tensor {
    checkMatmulSwiglu(x, gateUp);
    const n = rowsCols(x)[0], width = gateUp.shape[0] / 2;
    const gu = this.matmul(x, gateUp);
    const out = this.swigluOfGateUp(gu, n, width);
    this.free(gu);
    return out;
  }

  /** silu(gate) * up of an interleaved gateUp product [n, 2 width] -> [n, width]. */
  protected swigluOfGateUp(gateUp: Tensor, n: number, width: number): Tensor {
    const out = this.outputFloats(n * width);
    const args = { gateUp: t(gateUp).data, out, width, simd: this.simd };
    this.rows.run("swiglu", args, n, width, [out]);
    return new CpuTensor(out, [n, width]);
  }

  combineRows(out: Tensor, y: Tensor, sources: Int32Array, scales: Float32Array, k: number): void {
    const [n, h] = rowsCols(out), [ny] = rowsCols(y);
    checkCombine(n, ny, sources, scales, k);
    const args = { out: t(out).data, y: t(y).data, sources, scales, k, width: h, simd: this.simd };
    this.rows.run("combine", args, n, k * h, [args.out]);
  }

  async routedExperts(
    xn: Tensor,
    logits: Tensor,
    stacks: ExpertStacks,
    route: RouteSpec,
    out: Tensor,
  ): Promise<void> {
    checkRoutedExperts(xn, logits, stacks, route, out);
    const routing = await this.routeTopK(logits, route.k, route.normalize, route.eps);
    const plan = expertPlan(routing, route.k, stacks.down.shape[0]);
    const xe = this.gatherRows(xn, plan.order);
    const gu = this.groupedMatmul(xe, stacks.gateUp, plan.groupRows);
    this.free(xe);
    const a = this.swigluOfGateUp(gu, plan.order.length, stacks.down.shape[2]);
    this.free(gu);
    const y = this.groupedMatmul(a, stacks.down, plan.groupRows);
    this.free(a);
    this.combineRows(out, y, plan.sources, plan.scales, route.k);
    this.free(y);
  }

  add(a: Tensor, b: Tensor): Tensor {
    const as = t(a).data, bs = t(b).data;
    if (as.length !== bs.length) {
      throw new Error(`add: shapes [${a.shape}] and [${b.shape}] differ`);
    }
    const out = this.outputFloats(as.length);
    for (let i = 0; i < as.length; i++) out[i] = as[i] + bs[i];
    return new CpuTensor(out, a.shape);
  }

  mul(a: Tensor, b: Tensor): Tensor {
    const as = t(a).data, bs = t(b).data;
    if (as.length !== bs.length) {
      throw new Error(`mul: shapes [${a.shape}] and [${b.shape}] differ`);
    }
    const out = this.outputFloats(as.length);
    for (let i = 0; i < as.length; i++) out[i] = as[i] * bs[i];
    return new CpuTensor(out, a.shape);
  }

  swiglu(gate: Tensor, up: Tensor): Tensor {
    const g = t(gate).data, out = this.outputFloats(g.length);
    const args = { gate: g, up: t(up).data, out, simd: this.simd };
    this.rows.run("swigluApart", args, g.length, 1, [out]);
    return new CpuTensor(out, gate.shape);
  }

  clamp(x: Tensor, limit: number): Tensor {
    const xs = t(x).data, out = this.outputFloats(xs.length);
    // Plain loops, not typed-array map: its callback an entry took 2.5-10x the loop's time.
    for (let i = 0; i < xs.length; i++) out[i] = Math.min(limit, Math.max(-limit, xs[i]));
    return new CpuTensor(out, x.shape);
  }

  rope(
    x: Tensor,
    positions: Int32Array,
    heads: number,
    headDim: number,
    theta: number,
    linearFactor: number,
  ): Tensor {
    const [n, d] = rowsCols(x);
    if (d !== heads * headDim) {
      throw new Error(`rope: row width ${d} != ${heads} heads x ${headDim}`);
    }
    if (positions.length !== n) throw new Error(`rope: ${positions.length} positions, ${n} rows`);
    const rope = { positions, theta, linearFactor };
    return new CpuTensor(this.rotateHeads(t(x).data, d, 0, heads, headDim, rope), x.shape);
  }

  splitQkv(
    qkv: Tensor,
    heads: number,
    kvHeads: number,
    headDim: number,
    rope: RopeSpec | null,
  ): { q: Tensor; k: Tensor; v: Tensor } {
    checkSplitQkv(qkv, heads, kvHeads, headDim, rope);
    const [n, d] = rowsCols(qkv), xs = t(qkv).data;
    const columns = (c0: number, width: number) => {
      const out = this.outputFloats(n * width);
      for (let r = 0; r < n; r++) out.set(xs.subarray(r * d + c0, r * d + c0 + width), r * width);
      return new CpuTensor(out, [n, width]);
    };
    const qw = heads * headDim, kw = kvHeads * headDim, v = columns(qw + kw, kw);
    if (!rope) return { q: columns(0, qw), k: columns(qw, kw), v };
    // Rotated straight out of qkv: one pass over q and k, no copy before the rotation.
    return {
      q: new CpuTensor(this.rotateHeads(xs, d, 0, heads, headDim, rope), [n, qw]),
      k: new CpuTensor(this.rotateHeads(xs, d, qw, kvHeads, headDim, rope), [n, kw]),
      v,
    };
  }

  splitQkvIntoCache(
    qkv: Tensor,
    heads: number,
    kvHeads: number,
    headDim: number,
    rope: RopeSpec | null,
    cache: KvRows,
  ): Tensor {
    const kw = kvHeads * headDim, { q, k, v } = this.splitQkv(qkv, heads, kvHeads, headDim, rope);
    const rows = kvCacheRows(cache, q.shape[0], kw);
    for (const [from, to] of [[k, cache.k], [v, cache.v]]) {
      const src = t(from).data, dst = t(to).data;
      rows.forEach((row, r) => dst.set(src.subarray(r * kw, (r + 1) * kw), row * kw));
    }
    return q;
  }

  /**
   * HF rotate_half RoPE of `heads` heads read from columns c0.. of the rows of src (row
   * width srcWidth) -> [rows, heads * headDim]; sinSign -1 rotates back (ropeBackward).
   */
  protected rotateHeads(
    src: Float32Array,
    srcWidth: number,
    c0: number,
    heads: number,
    headDim: number,
    rope: RopeSpec,
    sinSign: 1 | -1 = 1,
  ): Float32Array {
    const n = rope.positions.length, out = this.outputFloats(n * heads * headDim);
    const { positions, theta, linearFactor } = rope;
    const args = {
      src,
      srcWidth,
      c0,
      out,
      heads,
      headDim,
      sinSign,
      positions,
      theta,
      linearFactor,
      simd: this.simd,
    };
    this.rows.run("rotateHeads", args, n, heads * headDim, [out]);
    return out;
  }

  attention(q: Tensor, k: Tensor, v: Tensor, s: AttentionShape): Tensor {
    const { batch, qLen, kvLen, heads, kvHeads, headDim, window } = s;
    const qs = t(q).data, ks = t(k).data, vs = t(v).data;
    const qw = heads * headDim, kw = kvHeads * headDim;
    const group = heads / kvHeads, stride = checkAttentionShape("attention", q, k, v, s);
    const out = this.floats(batch * qLen * qw);
    const scale = 1 / Math.sqrt(headDim);
    if (this.blas) {
      this.attentionBlas(qs, ks, vs, out, s, stride, scale);
      return new CpuTensor(out, [batch * qLen, qw]);
    }
    const scores = new Float64Array(kvLen);
    for (let b = 0; b < batch; b++) {
      for (let h = 0; h < heads; h++) {
        const kh = Math.floor(h / group);
        for (let i = 0; i < qLen; i++) {
          const pos = kvLen - qLen + i;
          const lo = window === null ? 0 : Math.max(0, pos - window + 1);
          const qo = (b * qLen + i) * qw + h * headDim;
          let max = -Infinity;
          for (let j = lo; j <= pos; j++) {
            const ko = (b * stride + j) * kw + kh * headDim;
            let dot = 0;
            for (let e = 0; e < headDim; e++) dot += qs[qo + e] * ks[ko + e];
            scores[j] = dot * scale;
            if (scores[j] > max) max = scores[j];
          }
          let sum = 0;
          for (let j = lo; j <= pos; j++) sum += scores[j] = exp(scores[j] - max);
          const oo = (b * qLen + i) * qw + h * headDim;
          for (let j = lo; j <= pos; j++) {
            const p = scores[j] / sum;
            const vo = (b * stride + j) * kw + kh * headDim;
            for (let e = 0; e < headDim; e++) out[oo + e] += p * vs[vo + e];
          }
        }
      }
    }
    return new CpuTensor(out, [batch * qLen, qw]);
  }

  // Same math with both products in BLAS: per (sequence, head), scores = Q K^T over the
  // strided head slices, the masked softmax (cpu_rows.ts), then P V written into the head's
  // columns. The softmax runs over the scores of many (sequence, head) pairs at once, so it
  // can be split between threads.
  private attentionBlas(
    qs: Float32Array,
    ks: Float32Array,
    vs: Float32Array,
    out: Float32Array,
    s: AttentionShape,
    stride: number, // rows per sequence in ks and vs
    scale: number,
  ): void {
    const { qLen, kvLen, headDim } = s;
    const qw = s.heads * headDim, kw = s.kvHeads * headDim, blas = this.blas!;
    const { chunk, block, pairs, offsets } = attentionPairs(s, stride);
    const p = this.outputFloats(chunk * block); // [chunk pairs, qLen, kvLen]
    for (let p0 = 0; p0 < pairs; p0 += chunk) {
      const count = Math.min(chunk, pairs - p0);
      this.attentionProbs(qs, ks, s, stride, scale, p0, count, p);
      for (let i = 0; i < count; i++) {
        const { q: qOff, k: kOff } = offsets(p0 + i), pi = p.subarray(i * block);
        const o = out.subarray(qOff), v = vs.subarray(kOff);
        blas.sgemm(false, false, qLen, headDim, kvLen, 1, pi, kvLen, v, kw, 0, o, qw);
      }
    }
    this.recycle(p);
  }

  /**
   * P = the masked softmax of scale Q K^T for the `count` (sequence, head) pairs from p0,
   * into p [count, qLen, kvLen]: the forward's and the backward's first steps.
   */
  protected attentionProbs(
    qs: Float32Array,
    ks: Float32Array,
    s: AttentionShape,
    stride: number,
    scale: number,
    p0: number,
    count: number,
    p: Float32Array,
  ): void {
    const { qLen, kvLen, headDim, window } = s;
    const qw = s.heads * headDim, kw = s.kvHeads * headDim, blas = this.blas!;
    const { block, offsets } = attentionPairs(s, stride);
    for (let i = 0; i < count; i++) {
      const { q: qOff, k: kOff } = offsets(p0 + i), pi = p.subarray(i * block);
      const q = qs.subarray(qOff), k = ks.subarray(kOff);
      blas.sgemm(false, true, qLen, kvLen, headDim, scale, q, qw, k, kw, 0, pi, kvLen);
    }
    const args = { scores: p, qLen, kvLen, window, simd: this.simd };
    this.rows.run("softmaxVisible", args, count * qLen, kvLen, [p]);
  }

  routeTopK(logits: Tensor, k: number, normalize: boolean, eps: number): Promise<Routing> {
    const [n, e] = rowsCols(logits);
    const ls = t(logits).data;
    const indices = new Int32Array(n * k), weights = new Float32Array(n * k);
    const p = new Float64Array(e);
    for (let r = 0; r < n; r++) {
      let max = -Infinity;
      for (let j = 0; j < e; j++) max = Math.max(max, ls[r * e + j]);
      let sum = 0;
      for (let j = 0; j < e; j++) sum += p[j] = exp(ls[r * e + j] - max);
      for (let j = 0; j < e; j++) p[j] /= sum;
      const order = topKIndices(p, k);
      let chosen = 0;
      for (let j = 0; j < k; j++) chosen += p[order[j]];
      for (let j = 0; j < k; j++) {
        indices[r * k + j] = order[j];
        weights[r * k + j] = normalize ? p[order[j]] / (chosen + eps) : p[order[j]];
      }
    }
    return Promise.resolve({ indices, weights });
  }

  gatherRows(x: Tensor, rows: Int32Array): Tensor {
    const [, h] = rowsCols(x);
    const xs = t(x).data, out = this.floats(rows.length * h);
    for (let i = 0; i < rows.length; i++) out.set(xs.subarray(rows[i] * h, rows[i] * h + h), i * h);
    return new CpuTensor(out, [rows.length, h]);
  }

  scatterAddRows(out: Tensor, y: Tensor, rows: Int32Array, scales: Float32Array): void {
    const [, h] = rowsCols(out);
    const os = t(out).data, ys = t(y).data;
    for (let i = 0; i < rows.length; i++) {
      const o = rows[i] * h, s = scales[i];
      for (let c = 0; c < h; c++) os[o + c] += s * ys[i * h + c];
    }
  }

  sigmoidScaleRows(y: Tensor, g: Tensor): Tensor {
    const [n, d] = rowsCols(y);
    const ys = t(y).data, gs = t(g).data, out = this.outputFloats(ys.length);
    for (let r = 0; r < n; r++) {
      const s = 1 / (1 + exp(-gs[r]));
      for (let c = 0; c < d; c++) out[r * d + c] = ys[r * d + c] * s;
    }
    return new CpuTensor(out, y.shape);
  }

  scale(y: Tensor, s: number): Tensor {
    const ys = t(y).data, out = this.outputFloats(ys.length);
    for (let i = 0; i < ys.length; i++) out[i] = ys[i] * s;
    return new CpuTensor(out, y.shape);
  }
}

/** Indices of the k largest values, largest first; ties keep the lower index first. */
export function topKIndices(p: ArrayLike<number>, k: number): number[] {
  // k passes of selection, not a sort: k is small, and this runs once per token per MoE
  // layer (sorting 16 experts with a comparator was 5% of the CPU forward).
  const chosen: number[] = [];
  for (let j = 0; j < Math.min(k, p.length); j++) {
    let best = -1;
    for (let i = 0; i < p.length; i++) {
      if (!chosen.includes(i) && (best < 0 || p[i] > p[best])) best = i;
    }
    chosen.push(best);
  }
  return chosen;
}
