// CPU backend. Its reference mode is plain f32 loops, written to be obviously right, with
// sums in JS doubles, so at least as accurate as f32 PyTorch. By default matmuls run in
// BLAS (without it, in WebAssembly SIMD: wasm_gemm.ts), and the elementwise passes
// (cpu_rows.ts) over worker threads, most in f32 WebAssembly SIMD lanes; each is tested
// against the reference. Freed arrays are reused.
// Weights are widened to f32 once on upload (the layer-wise mode keeps only one layer
// resident).

import { totalmem } from "node:os";
import { exp } from "./exp.ts";
import { coreThreads, defaultThreads, RowThreads, sharedFloats } from "./cpu_rows.ts";
import { type RawTensor, toFloat32 } from "../io/safetensors.ts";
import { type Blas, loadBlas } from "./blas.ts";
import { loadGemm, wasmBlas } from "./wasm_gemm.ts";
import {
  type AdamWHyper,
  argmaxRow,
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
  type TrainingBackend,
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
function attentionPairs(s: AttentionShape, stride: number) {
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

const t = (x: Tensor) => x as CpuTensor;
const w = (x: Weight) => x as CpuWeight;

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

export class CpuBackend implements TrainingBackend {
  readonly name = "cpu" as const;
  readonly description: string;
  readonly f32Weights = true;
  private blas: Blas | null;
  private rows: RowThreads;
  // Tensors and weights in shared memory, so worker threads can read and write them in place.
  private shared: boolean;
  // SwiGLU, softmax, the norms, RoPE and combine in f32 WebAssembly SIMD lanes (within a
  // few ulps of the doubles); the reference keeps its JS doubles.
  private simd: boolean;

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
  private floats(n: number, zeroed = true): Float32Array {
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
  private outputFloats(n: number): Float32Array {
    return this.floats(n, false);
  }

  /** Returns an array from floats() to the pool; anything else is left to the GC. */
  private recycle(data: Float32Array): void {
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
  private swigluOfGateUp(gateUp: Tensor, n: number, width: number): Tensor {
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
  private rotateHeads(
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
  private attentionProbs(
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

  // ---- training: backward ops (see BackwardOps in backend.ts for the contract) ----

  uploadTrainableWeight(raw: RawTensor): Weight {
    // toFloat32 always returns a fresh array, so the master copy owns its values.
    const values = this.shared ? sharedFloats(numelOf(raw.shape)) : toFloat32(raw);
    if (this.shared) values.set(toFloat32(raw));
    return new CpuWeight(raw.name, values, raw.shape, "F32");
  }
  readWeight(x: Weight): Promise<Float32Array> {
    return Promise.resolve(w(x).data.slice());
  }
  zero(x: Tensor): void {
    t(x).data.fill(0);
  }
  addInPlace(dst: Tensor, src: Tensor): void {
    const ds = t(dst).data, ss = t(src).data;
    if (ds.length !== ss.length) {
      throw new Error(`addInPlace: shapes [${dst.shape}] and [${src.shape}] differ`);
    }
    for (let i = 0; i < ds.length; i++) ds[i] += ss[i];
  }
  sumSquares(tensors: readonly Tensor[]): Promise<number> {
    let total = 0;
    for (const x of tensors) {
      const xs = t(x).data;
      let s = 0;
      for (let i = 0; i < xs.length; i++) s += xs[i] * xs[i]; // for-of ran 20x slower
      total += s;
    }
    return Promise.resolve(total);
  }

  matmulBackward(
    x: Tensor,
    weight: Weight,
    dy: Tensor,
    opts: { needInput: boolean; weightGrad?: Tensor; biasGrad?: Tensor },
  ): Tensor | null {
    const [n, k] = rowsCols(x);
    const [m] = weight.shape;
    const xs = t(x).data, ws = w(weight).data, dys = t(dy).data;
    if (dys.length !== n * m) throw new Error(`matmulBackward: dy [${dy.shape}] != [${n}, ${m}]`);
    let dx: CpuTensor | null = null;
    if (opts.needInput) dx = new CpuTensor(this.outputFloats(n * k), [n, k]); // [N, K]
    if (opts.biasGrad) {
      const bg = t(opts.biasGrad).data;
      for (let c = 0; c < m; c++) {
        let s = 0;
        for (let r = 0; r < n; r++) s += dys[r * m + c];
        bg[c] += s;
      }
    }
    if (n === 0) return dx;
    if (dx) this.inputGrad(dys, ws, dx.data, n, k, m);
    if (this.blas) {
      // dW[M, K] += dy^T @ x
      if (opts.weightGrad) {
        this.blas.sgemm(true, false, m, k, n, 1, dys, m, xs, k, 1, t(opts.weightGrad).data, k);
      }
      return dx;
    }
    if (opts.weightGrad) {
      const wg = t(opts.weightGrad).data;
      for (let c = 0; c < m; c++) {
        for (let i = 0; i < k; i++) {
          let s = 0;
          for (let r = 0; r < n; r++) s += dys[r * m + c] * xs[r * k + i];
          wg[c * k + i] += s;
        }
      }
    }
    return dx;
  }

  /** dx [n, K] = dy [n, M] @ w [M, K], written. */
  private inputGrad(
    dys: Float32Array,
    ws: Float32Array,
    dx: Float32Array,
    n: number,
    k: number,
    m: number,
  ): void {
    if (this.blas) return this.blas.sgemm(false, false, n, k, m, 1, dys, m, ws, k, 0, dx, k);
    for (let r = 0; r < n; r++) {
      for (let i = 0; i < k; i++) {
        let s = 0;
        for (let c = 0; c < m; c++) s += dys[r * m + c] * ws[c * k + i];
        dx[r * k + i] = s;
      }
    }
  }

  rmsNormBackward(x: Tensor, weight: Weight, dy: Tensor, eps: number, weightGrad?: Tensor): Tensor {
    const [n, d] = rowsCols(x);
    const xs = t(x).data, ws = w(weight).data, dys = t(dy).data;
    const dx = this.outputFloats(n * d); // [N, D]
    const wg = weightGrad ? t(weightGrad).data : null;
    for (let r = 0; r < n; r++) {
      const o = r * d;
      let ss = 0;
      for (let i = 0; i < d; i++) ss += xs[o + i] * xs[o + i];
      const inv = 1 / Math.sqrt(ss / d + eps);
      // y_i = w_i x_i inv  =>  dx_i = inv (w_i dy_i) - inv^3 x_i sum_j(w_j dy_j x_j) / D
      let dot = 0;
      for (let i = 0; i < d; i++) dot += ws[i] * dys[o + i] * xs[o + i];
      const c = (inv * inv * inv * dot) / d;
      for (let i = 0; i < d; i++) {
        dx[o + i] = inv * ws[i] * dys[o + i] - c * xs[o + i];
        if (wg) wg[i] += dys[o + i] * xs[o + i] * inv;
      }
    }
    return new CpuTensor(dx, x.shape);
  }

  swigluGateUp(gateUp: Tensor): Tensor {
    const [n, width] = checkGateUp("swigluGateUp", gateUp);
    return this.swigluOfGateUp(gateUp, n, width);
  }

  swigluGateUpBackward(gateUp: Tensor, dy: Tensor): Tensor {
    const [n, width] = checkGateUp("swigluGateUpBackward", gateUp);
    if (numelOf(dy.shape) !== n * width) {
      throw new Error(`swigluGateUpBackward: dy [${dy.shape}] != [${n}, ${width}]`);
    }
    const out = this.outputFloats(2 * n * width);
    const args = { gateUp: t(gateUp).data, dy: t(dy).data, out, width };
    this.rows.run("swigluGateUpBackward", args, n, 2 * width, [out]);
    return new CpuTensor(out, gateUp.shape);
  }

  groupedMatmulBackward(dy: Tensor, stack: Weight, groupRows: Int32Array): Tensor {
    const [r, m] = rowsCols(dy);
    const [g, , k] = stack.shape;
    checkGrouped(stack, m, groupRows, r, "groupedMatmulBackward", 1);
    const dx = this.outputFloats(r * k), dys = t(dy).data, ws = w(stack).data;
    for (let e = 0, r0 = 0; e < g; r0 += groupRows[e++]) {
      const n = groupRows[e];
      if (n === 0) continue;
      const dye = dys.subarray(r0 * m, (r0 + n) * m), we = ws.subarray(e * m * k, (e + 1) * m * k);
      this.inputGrad(dye, we, dx.subarray(r0 * k, (r0 + n) * k), n, k, m);
    }
    return new CpuTensor(dx, [r, k]);
  }

  swigluBackward(gate: Tensor, up: Tensor, dy: Tensor): { dGate: Tensor; dUp: Tensor } {
    const g = t(gate).data, dGate = this.outputFloats(g.length), dUp = this.outputFloats(g.length);
    const args = { gate: g, up: t(up).data, out: dGate, dy: t(dy).data, dUp, simd: this.simd };
    this.rows.run("swigluApart", args, g.length, 1, [dGate, dUp]);
    return { dGate: new CpuTensor(dGate, gate.shape), dUp: new CpuTensor(dUp, gate.shape) };
  }

  clampBackward(x: Tensor, dy: Tensor, limit: number): Tensor {
    const xs = t(x).data, dys = t(dy).data, dx = this.outputFloats(xs.length);
    for (let i = 0; i < xs.length; i++) dx[i] = xs[i] >= -limit && xs[i] <= limit ? dys[i] : 0;
    return new CpuTensor(dx, x.shape);
  }

  ropeBackward(
    dy: Tensor,
    positions: Int32Array,
    heads: number,
    headDim: number,
    theta: number,
    linearFactor: number,
  ): Tensor {
    const [n, d] = rowsCols(dy);
    if (positions.length !== n) {
      throw new Error(`ropeBackward: ${positions.length} positions, ${n} rows`);
    }
    // The rotation is orthogonal: its transpose is the rotation by the negated angle.
    const rope = { positions, theta, linearFactor };
    return new CpuTensor(this.rotateHeads(t(dy).data, d, 0, heads, headDim, rope, -1), dy.shape);
  }

  attentionSaving(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: AttentionShape,
  ): { out: Tensor; stats: Tensor | null } {
    return { out: this.attention(q, k, v, s), stats: null };
  }

  attentionBackward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dOut: Tensor,
    s: AttentionShape,
  ): { dq: Tensor; dk: Tensor; dv: Tensor } {
    const { batch, qLen, kvLen, heads, kvHeads, headDim, window } = s;
    checkAttentionBackward(q, k, v, dOut, s);
    const qs = t(q).data, ks = t(k).data, vs = t(v).data, dos = t(dOut).data;
    const qw = heads * headDim, kw = kvHeads * headDim, group = heads / kvHeads;
    const dq = this.floats(batch * qLen * qw); // [B*qLen, heads*hd]
    const dk = this.floats(batch * kvLen * kw); // [B*kvLen, kvHeads*hd]
    const dv = this.floats(batch * kvLen * kw);
    const scale = 1 / Math.sqrt(headDim);
    const result = () => ({
      dq: new CpuTensor(dq, [batch * qLen, qw]),
      dk: new CpuTensor(dk, [batch * kvLen, kw]),
      dv: new CpuTensor(dv, [batch * kvLen, kw]),
    });
    if (this.blas) {
      this.attentionBackwardBlas(qs, ks, vs, dos, dq, dk, dv, s, scale);
      return result();
    }
    const p = new Float64Array(kvLen), dp = new Float64Array(kvLen);
    for (let b = 0; b < batch; b++) {
      for (let h = 0; h < heads; h++) {
        const kh = Math.floor(h / group);
        for (let i = 0; i < qLen; i++) {
          const pos = kvLen - qLen + i;
          const lo = window === null ? 0 : Math.max(0, pos - window + 1);
          const qo = (b * qLen + i) * qw + h * headDim;
          // recompute the probabilities of this query row
          let max = -Infinity;
          for (let j = lo; j <= pos; j++) {
            const ko = (b * kvLen + j) * kw + kh * headDim;
            let dot = 0;
            for (let e = 0; e < headDim; e++) dot += qs[qo + e] * ks[ko + e];
            p[j] = dot * scale;
            if (p[j] > max) max = p[j];
          }
          let sum = 0;
          for (let j = lo; j <= pos; j++) sum += p[j] = exp(p[j] - max);
          // dv_j += p_j dOut; dp_j = dOut . v_j; ds_j = p_j (dp_j - sum_l p_l dp_l)
          let pdp = 0;
          for (let j = lo; j <= pos; j++) {
            p[j] /= sum;
            const vo = (b * kvLen + j) * kw + kh * headDim;
            let dot = 0;
            for (let e = 0; e < headDim; e++) {
              dot += dos[qo + e] * vs[vo + e];
              dv[vo + e] += p[j] * dos[qo + e];
            }
            dp[j] = dot;
            pdp += p[j] * dot;
          }
          for (let j = lo; j <= pos; j++) {
            const ds = p[j] * (dp[j] - pdp) * scale;
            const ko = (b * kvLen + j) * kw + kh * headDim;
            for (let e = 0; e < headDim; e++) {
              dq[qo + e] += ds * ks[ko + e];
              dk[ko + e] += ds * qs[qo + e];
            }
          }
        }
      }
    }
    return result();
  }

  // Per (sequence, head): P recomputed as in attentionBlas, then dV += P^T dO,
  // dP = dO V^T, dS = P (dP - rowsum(P dP)), dQ = scale dS K, dK += scale dS^T Q.
  private attentionBackwardBlas(
    qs: Float32Array,
    ks: Float32Array,
    vs: Float32Array,
    dos: Float32Array,
    dq: Float32Array,
    dk: Float32Array,
    dv: Float32Array,
    s: AttentionShape,
    scale: number,
  ): void {
    const { qLen, kvLen, headDim } = s;
    const qw = s.heads * headDim, kw = s.kvHeads * headDim, blas = this.blas!;
    // As the forward: the softmax and its backward run over chunks of (sequence, head)
    // pairs at once, so their rows split between threads.
    const { chunk, block, pairs, offsets } = attentionPairs(s, kvLen);
    const p = this.outputFloats(chunk * block); // [chunk pairs, qLen, kvLen]
    const dp = this.outputFloats(chunk * block);
    for (let p0 = 0; p0 < pairs; p0 += chunk) {
      const count = Math.min(chunk, pairs - p0);
      this.attentionProbs(qs, ks, s, kvLen, scale, p0, count, p);
      for (let i = 0; i < count; i++) {
        const { q: qOff, k: kOff } = offsets(p0 + i);
        const pi = p.subarray(i * block), dpi = dp.subarray(i * block);
        const dO = dos.subarray(qOff), v = vs.subarray(kOff), dvi = dv.subarray(kOff);
        blas.sgemm(true, false, kvLen, headDim, qLen, 1, pi, kvLen, dO, qw, 1, dvi, kw);
        blas.sgemm(false, true, qLen, kvLen, headDim, 1, dO, qw, v, kw, 0, dpi, kvLen);
      }
      this.rows.run("softmaxBackward", { p, dp, width: kvLen }, count * qLen, kvLen, [dp]);
      for (let i = 0; i < count; i++) {
        const { q: qOff, k: kOff } = offsets(p0 + i), ds = dp.subarray(i * block);
        const q = qs.subarray(qOff), k = ks.subarray(kOff);
        const dqi = dq.subarray(qOff), dki = dk.subarray(kOff);
        blas.sgemm(false, false, qLen, headDim, kvLen, scale, ds, kvLen, k, kw, 0, dqi, qw);
        blas.sgemm(true, false, kvLen, headDim, qLen, scale, ds, kvLen, q, qw, 1, dki, kw);
      }
    }
    this.recycle(p), this.recycle(dp);
  }

  embeddingBackward(ids: Int32Array, dy: Tensor, tableGrad: Tensor): void {
    const [, h] = rowsCols(dy);
    const dys = t(dy).data, tg = t(tableGrad).data;
    for (let i = 0; i < ids.length; i++) {
      const o = ids[i] * h;
      for (let c = 0; c < h; c++) tg[o + c] += dys[i * h + c];
    }
  }

  scatterAddRowsBackward(
    dOut: Tensor,
    y: Tensor,
    rows: Int32Array,
    scales: Float32Array,
  ): { dy: Tensor; dScales: Tensor } {
    const [, h] = rowsCols(dOut);
    const dos = t(dOut).data, ys = t(y).data;
    const dy = this.outputFloats(rows.length * h); // [rows, H]
    const dScales = this.outputFloats(rows.length);
    for (let i = 0; i < rows.length; i++) {
      const o = rows[i] * h;
      let dot = 0;
      for (let c = 0; c < h; c++) {
        dy[i * h + c] = scales[i] * dos[o + c];
        dot += dos[o + c] * ys[i * h + c];
      }
      dScales[i] = dot;
    }
    return {
      dy: new CpuTensor(dy, [rows.length, h]),
      dScales: new CpuTensor(dScales, [rows.length]),
    };
  }

  routeTopKBackward(
    logits: Tensor,
    routing: Routing,
    dWeights: Float32Array,
    normalize: boolean,
    eps: number,
  ): Tensor {
    const [n, e] = rowsCols(logits);
    const k = routing.indices.length / n;
    const ls = t(logits).data, dl = this.floats(n * e); // [N, E]
    const p = new Float64Array(e), dp = new Float64Array(e);
    for (let r = 0; r < n; r++) {
      let max = -Infinity;
      for (let j = 0; j < e; j++) max = Math.max(max, ls[r * e + j]);
      let sum = 0;
      for (let j = 0; j < e; j++) sum += p[j] = exp(ls[r * e + j] - max);
      for (let j = 0; j < e; j++) p[j] /= sum;
      // gradient to the probabilities: only the selected ones receive any
      dp.fill(0);
      if (normalize) {
        // w_j = p_sj / (S + eps), S = sum of the selected p
        let chosen = 0, dotWp = 0;
        for (let j = 0; j < k; j++) {
          const pj = p[routing.indices[r * k + j]];
          chosen += pj, dotWp += dWeights[r * k + j] * pj;
        }
        const z = chosen + eps;
        for (let j = 0; j < k; j++) {
          dp[routing.indices[r * k + j]] += dWeights[r * k + j] / z - dotWp / (z * z);
        }
      } else {
        for (let j = 0; j < k; j++) dp[routing.indices[r * k + j]] += dWeights[r * k + j];
      }
      // softmax backward: dlogit_j = p_j (dp_j - sum_l p_l dp_l)
      let pdp = 0;
      for (let j = 0; j < e; j++) pdp += p[j] * dp[j];
      for (let j = 0; j < e; j++) dl[r * e + j] = p[j] * (dp[j] - pdp);
    }
    return new CpuTensor(dl, logits.shape);
  }

  sigmoidScaleRowsBackward(y: Tensor, g: Tensor, dOut: Tensor): { dy: Tensor; dg: Tensor } {
    const [n, d] = rowsCols(y);
    const ys = t(y).data, gs = t(g).data, dos = t(dOut).data;
    const dy = this.floats(ys.length), dg = this.floats(n); // [N, D], [N, 1]
    for (let r = 0; r < n; r++) {
      const sig = 1 / (1 + exp(-gs[r]));
      let dot = 0;
      for (let c = 0; c < d; c++) {
        dy[r * d + c] = dos[r * d + c] * sig;
        dot += dos[r * d + c] * ys[r * d + c];
      }
      dg[r] = dot * sig * (1 - sig);
    }
    return { dy: new CpuTensor(dy, y.shape), dg: new CpuTensor(dg, g.shape) };
  }

  crossEntropy(
    logits: Tensor,
    targets: Int32Array,
    ignoreIndex: number,
    gradScale?: number,
  ): Promise<{ loss: number; count: number; dLogits: Tensor }> {
    const [n, vocab] = rowsCols(logits);
    const ls = t(logits).data, dl = this.floats(n * vocab); // [N, V]
    let count = 0;
    for (let r = 0; r < n; r++) if (targets[r] !== ignoreIndex) count++;
    const g = gradScale ?? (count > 0 ? 1 / count : 0);
    let lossSum = 0;
    for (let r = 0; r < n; r++) {
      const target = targets[r];
      if (target === ignoreIndex) continue;
      if (target < 0 || target >= vocab) throw new Error(`target ${target} out of range`);
      const o = r * vocab;
      let max = -Infinity;
      for (let j = 0; j < vocab; j++) max = Math.max(max, ls[o + j]);
      let sum = 0;
      for (let j = 0; j < vocab; j++) sum += exp(ls[o + j] - max);
      lossSum += Math.log(sum) + max - ls[o + target];
      for (let j = 0; j < vocab; j++) dl[o + j] = g * (exp(ls[o + j] - max) / sum);
      dl[o + target] -= g;
    }
    const loss = count > 0 ? lossSum / count : 0;
    return Promise.resolve({ loss, count, dLogits: new CpuTensor(dl, logits.shape) });
  }

  adamwStep(param: Weight, grad: Tensor, m: Tensor, v: Tensor, hp: AdamWHyper): void {
    const ps = w(param).data, gs = t(grad).data, ms = t(m).data, vs = t(v).data;
    if (param.dtype !== "F32" || gs.length !== ps.length) {
      throw new Error(`adamwStep: "${param.name}" is not a trainable weight of grad's size`);
    }
    const args = { p: ps, g: gs, m: ms, v: vs, hp, simd: this.simd };
    this.rows.run("adamw", args, ps.length, 1, [ps, ms, vs]);
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
