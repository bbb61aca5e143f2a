// Divergences between the original model's rows (hidden states or logits) and a
// modified model's rows, per token, averaged over a document's tokens and then over
// documents, as the CD-MoE reference does. The original side is precomputed once
// (probabilities, their entropy term) so a candidate costs one pass over its rows.

import { exp } from "../backend/exp.ts";
import { defaultThreads, RowThreads, sharedFloats } from "../backend/cpu_rows.ts";
import type { BatchShape } from "../model/decoder.ts";

export const METRICS = ["js-hidden", "js-logits", "kl-logits", "loss", "cosine"] as const;
export type Metric = typeof METRICS[number];

/** Metrics computed on hidden states (layer outputs, final normed hidden); the rest need logits. */
export function onHidden(metric: Metric): boolean {
  return metric === "js-hidden" || metric === "cosine";
}

export function parseMetric(value: string, flag = "--metric"): Metric {
  if (!(METRICS as readonly string[]).includes(value)) {
    throw new Error(`${flag}: unknown metric "${value}" (choose one of ${METRICS.join(", ")})`);
  }
  return value as Metric;
}

/** The reference's eps, added to both probability vectors before JS. */
export const JS_EPS = 1e-10;

/**
 * Row-wise softmax + eps (f64 math, stored f32), and per row sum(p log p) of the stored
 * values: with the unrounded ones, JS(P||P) came out near 1e-9 instead of 0.
 */
function probsWithEps(rows: Float32Array, dim: number): { p: Float32Array; plogp: Float64Array } {
  const n = rows.length / dim;
  // in shared memory: the JS rows are split between threads
  const p = sharedFloats(rows.length), plogp = new Float64Array(new SharedArrayBuffer(8 * n));
  for (let r = 0; r < n; r++) {
    const o = r * dim;
    let max = -Infinity;
    for (let i = 0; i < dim; i++) if (rows[o + i] > max) max = rows[o + i];
    let sum = 0;
    for (let i = 0; i < dim; i++) sum += exp(rows[o + i] - max);
    let s = 0;
    for (let i = 0; i < dim; i++) {
      const v = Math.fround(exp(rows[o + i] - max) / sum + JS_EPS);
      p[o + i] = v;
      s += v * Math.log(v);
    }
    plogp[r] = s;
  }
  return { p, plogp };
}

function logSoftmaxRows(rows: Float32Array, dim: number): Float32Array {
  const out = new Float32Array(rows.length);
  for (let o = 0; o < rows.length; o += dim) {
    let max = -Infinity;
    for (let i = 0; i < dim; i++) if (rows[o + i] > max) max = rows[o + i];
    let sum = 0;
    for (let i = 0; i < dim; i++) sum += exp(rows[o + i] - max);
    const lse = max + Math.log(sum);
    for (let i = 0; i < dim; i++) out[o + i] = rows[o + i] - lse;
  }
  return out;
}

/** Precomputed original-model side for one batch. */
interface RefBatch {
  shape: BatchShape;
  rows?: Float32Array;
  p?: Float32Array;
  plogp?: Float64Array;
  logp?: Float32Array;
  targets?: Int32Array;
}

/**
 * The original model's rows for every calibration batch, ready to be compared with a
 * candidate's rows. `docs` counts documents; divergence() returns the mean over them.
 */
export class Reference {
  private batches: RefBatch[] = [];
  private threads: RowThreads;
  private simd: boolean;
  private jsOfRows: Float64Array = new Float64Array(0); // the JS of each row of a batch

  /**
   * threads: for the JS rows (default as the CPU backend's; each row runs the same way);
   * simd: the JS rows in f64 WebAssembly lanes where available (false: jsRow's JS).
   */
  constructor(
    readonly metric: Metric,
    readonly dim: number,
    opts: { threads?: number; simd?: boolean } = {},
  ) {
    this.threads = RowThreads.shared(opts.threads ?? defaultThreads());
    this.simd = opts.simd ?? true;
  }

  /** `rows` [batch*seqLen, dim] of the original model; `ids` needed for "loss". */
  add(rows: Float32Array | null, shape: BatchShape, ids?: Int32Array): void {
    const b: RefBatch = { shape };
    switch (this.metric) {
      case "js-hidden":
      case "js-logits":
        Object.assign(b, probsWithEps(rows!, this.dim));
        break;
      case "kl-logits":
        b.logp = logSoftmaxRows(rows!, this.dim);
        break;
      case "cosine":
        b.rows = rows!.slice();
        break;
      case "loss":
        b.targets = ids!;
        break;
    }
    this.batches.push(b);
  }

  get numBatches(): number {
    return this.batches.length;
  }

  /** Batch bi's original softmax + eps (JS metrics), for a divergence on the device. */
  probs(bi: number): Float32Array {
    const p = this.batches[bi].p;
    if (!p) throw new Error(`Reference: ${this.metric} keeps no probabilities`);
    return p;
  }

  /** Per-document means of batch bi from one divergence per row. */
  meansOfRows(bi: number, perRow: ArrayLike<number>): number[] {
    const { batch, seqLen } = this.batches[bi].shape, out: number[] = [];
    for (let d = 0; d < batch; d++) {
      let sum = 0;
      for (let t = 0; t < seqLen; t++) sum += perRow[d * seqLen + t];
      out.push(sum / seqLen);
    }
    return out;
  }

  /** Per-document mean divergence of batch `bi` against candidate rows `cond`. */
  docMeans(bi: number, cond: Float32Array): number[] {
    const b = this.batches[bi], dim = this.dim, { batch, seqLen } = b.shape;
    if (this.metric === "js-hidden" || this.metric === "js-logits") {
      const rows = batch * seqLen;
      if (this.jsOfRows.length < rows) {
        this.jsOfRows = new Float64Array(new SharedArrayBuffer(8 * rows));
      }
      const args = {
        p: b.p!,
        plogp: b.plogp!,
        cond,
        out: this.jsOfRows,
        dim,
        eps: JS_EPS,
        simd: this.simd,
      };
      this.threads.run("jsDivergence", args, rows, dim, [this.jsOfRows]);
      return this.meansOfRows(bi, this.jsOfRows);
    }
    const out: number[] = [];
    for (let d = 0; d < batch; d++) {
      let sum = 0, count = 0;
      for (let t = 0; t < seqLen; t++) {
        const r = d * seqLen + t, o = r * dim;
        switch (this.metric) {
          case "kl-logits":
            sum += klRow(b.logp!, cond, o, dim);
            break;
          case "cosine":
            sum += 1 - cosineRow(b.rows!, cond, o, dim);
            break;
          case "loss": {
            if (t === seqLen - 1) continue; // the last token has no next token
            sum += nllRow(cond, o, dim, b.targets![r + 1]);
            break;
          }
        }
        count++;
      }
      out.push(sum / count);
    }
    return out;
  }
}

/** KL(P||Q) over the vocabulary, P the original model's distribution. */
function klRow(logp: Float32Array, cond: Float32Array, o: number, dim: number) {
  let max = -Infinity;
  for (let i = 0; i < dim; i++) if (cond[o + i] > max) max = cond[o + i];
  let sum = 0;
  for (let i = 0; i < dim; i++) sum += exp(cond[o + i] - max);
  const lse = max + Math.log(sum);
  let kl = 0;
  for (let i = 0; i < dim; i++) kl += exp(logp[o + i]) * (logp[o + i] - (cond[o + i] - lse));
  return Math.max(0, kl);
}

function cosineRow(a: Float32Array, b: Float32Array, o: number, dim: number) {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < dim; i++) {
    ab += a[o + i] * b[o + i];
    aa += a[o + i] * a[o + i];
    bb += b[o + i] * b[o + i];
  }
  return ab / (Math.sqrt(aa * bb) || 1);
}

function nllRow(logits: Float32Array, o: number, dim: number, target: number) {
  let max = -Infinity;
  for (let i = 0; i < dim; i++) if (logits[o + i] > max) max = logits[o + i];
  let sum = 0;
  for (let i = 0; i < dim; i++) sum += exp(logits[o + i] - max);
  return max + Math.log(sum) - logits[o + target];
}

/** Mean over documents of per-document means (collected over batches). */
export function meanOverDocs(docMeans: number[]): number {
  return docMeans.reduce((a, b) => a + b, 0) / docMeans.length;
}
