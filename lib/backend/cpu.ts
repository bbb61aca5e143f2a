// CPU reference backend: plain f32 loops, written to be obviously right. Weights are
// widened to f32 once on upload (the layer-wise mode keeps only one layer resident).
// Sums accumulate in JS doubles, so this path is at least as accurate as f32 PyTorch.

import { type RawTensor, toFloat32 } from "../io/safetensors.ts";
import { type Blas, loadBlas } from "./blas.ts";
import {
  type AttentionShape,
  type Backend,
  numelOf,
  type Routing,
  rowsCols,
  type Tensor,
  type Weight,
  type WeightDType,
} from "./backend.ts";

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

export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

export interface CpuOptions {
  /** Plain loops only, no BLAS: the oracle the fast paths are tested against. */
  reference?: boolean;
}

export class CpuBackend implements Backend {
  readonly name = "cpu" as const;
  readonly description: string;
  private blas: Blas | null;

  constructor(opts: CpuOptions = {}) {
    this.blas = opts.reference ? null : loadBlas();
    this.description = this.blas
      ? `CPU f32, matmul by ${this.blas.library}`
      : "CPU f32 reference loops";
  }

  uploadWeight(raw: RawTensor): Weight {
    if (raw.dtype !== "F32" && raw.dtype !== "BF16" && raw.dtype !== "F16") {
      throw new Error(`weight "${raw.name}": dtype ${raw.dtype} is not a float type`);
    }
    return new CpuWeight(raw.name, toFloat32(raw), raw.shape, raw.dtype);
  }
  freeWeight(_w: Weight): void {}
  tensor(data: Float32Array, shape: readonly number[]): Tensor {
    return new CpuTensor(data, [...shape]);
  }
  read(x: Tensor): Promise<Float32Array> {
    return Promise.resolve(t(x).data);
  }
  free(_x: Tensor): void {}

  embedding(table: Weight, ids: Int32Array): Tensor {
    const [vocab, h] = table.shape;
    const out = new Float32Array(ids.length * h);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (id < 0 || id >= vocab) throw new Error(`token id ${id} out of range [0, ${vocab})`);
      out.set(w(table).data.subarray(id * h, (id + 1) * h), i * h);
    }
    return new CpuTensor(out, [ids.length, h]);
  }

  rmsNorm(x: Tensor, weight: Weight, eps: number): Tensor {
    const [n, d] = rowsCols(x);
    const xs = t(x).data, ws = w(weight).data;
    const out = new Float32Array(n * d);
    for (let r = 0; r < n; r++) {
      let ss = 0;
      for (let i = 0; i < d; i++) ss += xs[r * d + i] * xs[r * d + i];
      const inv = 1 / Math.sqrt(ss / d + eps);
      for (let i = 0; i < d; i++) out[r * d + i] = ws[i] * (xs[r * d + i] * inv);
    }
    return new CpuTensor(out, x.shape);
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
    const out = new Float32Array(n * m);
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

  add(a: Tensor, b: Tensor): Tensor {
    const as = t(a).data, bs = t(b).data;
    if (as.length !== bs.length) {
      throw new Error(`add: shapes [${a.shape}] and [${b.shape}] differ`);
    }
    const out = new Float32Array(as.length);
    for (let i = 0; i < as.length; i++) out[i] = as[i] + bs[i];
    return new CpuTensor(out, a.shape);
  }

  swiglu(gate: Tensor, up: Tensor): Tensor {
    const g = t(gate).data, u = t(up).data;
    const out = new Float32Array(g.length);
    for (let i = 0; i < g.length; i++) out[i] = (g[i] / (1 + Math.exp(-g[i]))) * u[i];
    return new CpuTensor(out, gate.shape);
  }

  clamp(x: Tensor, limit: number): Tensor {
    const out = t(x).data.map((v) => Math.min(limit, Math.max(-limit, v)));
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
    const xs = t(x).data, out = new Float32Array(xs.length);
    const half = headDim / 2;
    // cos/sin per distinct position (positions repeat across the batch), with HF's f32
    // inv_freq = 1 / theta^(2i/d) and f32 angle.
    const invFreq = Array.from(
      { length: half },
      (_, i) => Math.fround(1 / Math.fround(theta ** ((2 * i) / headDim))),
    );
    const tables = new Map<number, [Float64Array, Float64Array]>();
    for (let r = 0; r < n; r++) {
      let cs = tables.get(positions[r]);
      if (!cs) {
        const pos = positions[r] / linearFactor;
        cs = [new Float64Array(half), new Float64Array(half)];
        for (let i = 0; i < half; i++) {
          const angle = Math.fround(pos * invFreq[i]);
          cs[0][i] = Math.cos(angle), cs[1][i] = Math.sin(angle);
        }
        tables.set(positions[r], cs);
      }
      const [cos, sin] = cs;
      for (let h = 0; h < heads; h++) {
        const o = r * d + h * headDim;
        for (let i = 0; i < half; i++) {
          const a = xs[o + i], b = xs[o + i + half];
          out[o + i] = a * cos[i] - b * sin[i];
          out[o + i + half] = b * cos[i] + a * sin[i];
        }
      }
    }
    return new CpuTensor(out, x.shape);
  }

  attention(q: Tensor, k: Tensor, v: Tensor, s: AttentionShape): Tensor {
    const { batch, qLen, kvLen, heads, kvHeads, headDim, window } = s;
    const qs = t(q).data, ks = t(k).data, vs = t(v).data;
    const qw = heads * headDim, kw = kvHeads * headDim;
    const group = heads / kvHeads;
    const out = new Float32Array(batch * qLen * qw);
    const scale = 1 / Math.sqrt(headDim);
    if (this.blas) {
      this.attentionBlas(qs, ks, vs, out, s, scale);
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
            const ko = (b * kvLen + j) * kw + kh * headDim;
            let dot = 0;
            for (let e = 0; e < headDim; e++) dot += qs[qo + e] * ks[ko + e];
            scores[j] = dot * scale;
            if (scores[j] > max) max = scores[j];
          }
          let sum = 0;
          for (let j = lo; j <= pos; j++) sum += scores[j] = Math.exp(scores[j] - max);
          const oo = (b * qLen + i) * qw + h * headDim;
          for (let j = lo; j <= pos; j++) {
            const p = scores[j] / sum;
            const vo = (b * kvLen + j) * kw + kh * headDim;
            for (let e = 0; e < headDim; e++) out[oo + e] += p * vs[vo + e];
          }
        }
      }
    }
    return new CpuTensor(out, [batch * qLen, qw]);
  }

  // Same math with both products in BLAS: per (sequence, head), scores = Q K^T over the
  // strided head slices, masked softmax in JS, then P V written into the head's columns.
  private attentionBlas(
    qs: Float32Array,
    ks: Float32Array,
    vs: Float32Array,
    out: Float32Array,
    s: AttentionShape,
    scale: number,
  ): void {
    const { batch, qLen, kvLen, heads, kvHeads, headDim, window } = s;
    const qw = heads * headDim, kw = kvHeads * headDim, group = heads / kvHeads;
    const scores = new Float32Array(qLen * kvLen); // [qLen, kvLen]
    for (let b = 0; b < batch; b++) {
      for (let h = 0; h < heads; h++) {
        const kh = Math.floor(h / group);
        const q = qs.subarray(b * qLen * qw + h * headDim);
        const k = ks.subarray(b * kvLen * kw + kh * headDim);
        const v = vs.subarray(b * kvLen * kw + kh * headDim);
        this.blas!.sgemm(false, true, qLen, kvLen, headDim, scale, q, qw, k, kw, 0, scores, kvLen);
        for (let i = 0; i < qLen; i++) {
          const pos = kvLen - qLen + i;
          const lo = window === null ? 0 : Math.max(0, pos - window + 1);
          const row = scores.subarray(i * kvLen, (i + 1) * kvLen);
          let max = -Infinity;
          for (let j = lo; j <= pos; j++) if (row[j] > max) max = row[j];
          let sum = 0;
          for (let j = lo; j <= pos; j++) sum += row[j] = Math.exp(row[j] - max);
          for (let j = 0; j < kvLen; j++) row[j] = j >= lo && j <= pos ? row[j] / sum : 0;
        }
        const o = out.subarray(b * qLen * qw + h * headDim);
        this.blas!.sgemm(false, false, qLen, headDim, kvLen, 1, scores, kvLen, v, kw, 0, o, qw);
      }
    }
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
      for (let j = 0; j < e; j++) sum += p[j] = Math.exp(ls[r * e + j] - max);
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
    const xs = t(x).data, out = new Float32Array(rows.length * h);
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
    const ys = t(y).data, gs = t(g).data, out = new Float32Array(ys.length);
    for (let r = 0; r < n; r++) {
      const s = 1 / (1 + Math.exp(-gs[r]));
      for (let c = 0; c < d; c++) out[r * d + c] = ys[r * d + c] * s;
    }
    return new CpuTensor(out, y.shape);
  }

  scale(y: Tensor, s: number): Tensor {
    return new CpuTensor(t(y).data.map((v) => v * s), y.shape);
  }
}

/** Indices of the k largest values, largest first; ties keep the lower index first. */
export function topKIndices(p: ArrayLike<number>, k: number): number[] {
  const idx = Array.from({ length: p.length }, (_, i) => i);
  idx.sort((a, b) => p[b] - p[a] || a - b);
  return idx.slice(0, k);
}
