// The CPU backend's elementwise passes, written over a range of rows so the rows can be
// split between the main thread and worker threads (cpu_rows_worker.ts). BLAS already
// uses every core for the matmuls; without this, half of a forward ran in one JS thread
// while the other cores idled. Each row is computed the same way whoever runs it, so a
// split result is bit-identical to a single-threaded one.

import { Worker } from "node:worker_threads";
import { exp } from "./exp.ts";
import { type AdamWHyper, GATE_UP_RUN } from "./backend.ts";
import { SIMD_WASM_BASE64 } from "./simd_wasm.ts";
import { gemmPart } from "./wasm_gemm.ts";
import { instantiateWasm } from "./wasm_module.ts";

/**
 * simd.wat's kernels on this thread (each worker has its own instance), or null where
 * WebAssembly SIMD is missing. Rows are copied into its memory and back: e^x in four f32
 * lanes made SwiGLU 3x faster than the JS loop, copies included.
 */
interface SimdKernels {
  /** The module's memory as f32, at least `floats` long. */
  heap(floats: number): Float32Array;
  swiglu(gateUpByte: number, outByte: number, runs: number): void;
  softmaxCausal(byte: number, rows: number, kvLen: number, pos0: number, window: number): void;
  swigluApart(gateByte: number, upByte: number, outByte: number, vecs: number): void;
  swigluApartBackward(gateByte: number, upByte: number, dyByte: number, vecs: number): void;
  rmsNorm(
    xByte: number,
    bByte: number,
    sumByte: number,
    weightByte: number,
    outByte: number,
    rows: number,
    width: number,
    eps: number,
  ): void;
  rope(xByte: number, cosSinByte: number, rows: number, heads: number, headDim: number): void;
  combine(
    outByte: number,
    yByte: number,
    scaleByte: number,
    rows: number,
    k: number,
    width: number,
  ): void;
  adamw(
    pByte: number,
    gByte: number,
    mByte: number,
    vByte: number,
    vecs: number,
    lr: number,
    beta1: number,
    c1: number,
    beta2: number,
    c2: number,
    eps: number,
    wd: number,
    gradScale: number,
    bc1: number,
    bc2: number,
  ): void;
  jsRows(
    pByte: number,
    plogpByte: number,
    condByte: number,
    outByte: number,
    expByte: number,
    rows: number,
    dim: number,
    eps: number,
  ): void;
}

let simdKernels: SimdKernels | null | undefined;

function loadSimd(): SimdKernels | null {
  if (simdKernels !== undefined) return simdKernels;
  try {
    const { exports, heap } = instantiateWasm(SIMD_WASM_BASE64);
    simdKernels = {
      heap,
      swiglu: exports.swiglu as SimdKernels["swiglu"],
      softmaxCausal: exports.softmax_causal as SimdKernels["softmaxCausal"],
      swigluApart: exports.swiglu_apart as SimdKernels["swigluApart"],
      swigluApartBackward: exports.swiglu_apart_backward as SimdKernels["swigluApartBackward"],
      rmsNorm: exports.rms_norm as SimdKernels["rmsNorm"],
      rope: exports.rope as SimdKernels["rope"],
      combine: exports.combine as SimdKernels["combine"],
      adamw: exports.adamw as SimdKernels["adamw"],
      jsRows: exports.js_rows as SimdKernels["jsRows"],
    };
  } catch {
    simdKernels = null; // no WebAssembly SIMD here: the JS loops run
  }
  return simdKernels;
}

// SwiGLU outputs per copy into the SIMD module (with their gate and up values: 192 KiB),
// score entries per softmax copy (at least a row), and entries of each array per copy of
// the norms, RoPE, combine and AdamW (at least a row).
const SIMD_SWIGLU_CHUNK = 16384;
const SIMD_SOFTMAX_CHUNK = 65536;
const SIMD_ROWS_CHUNK = 16384;

/** Rows of `width` per SIMD copy. */
function rowsPerCopy(width: number): number {
  return Math.max(1, Math.floor(SIMD_ROWS_CHUNK / width));
}

/**
 * out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps) for rows of the given width. simd (widths
 * that are a multiple of 4): in f32 WebAssembly lanes with the sum of squares in f64,
 * within an ulp or two of the JS doubles.
 */
function rmsNorm(
  a: {
    x: Float32Array;
    weight: Float32Array;
    out: Float32Array;
    width: number;
    eps: number;
    simd: boolean;
  },
  r0: number,
  r1: number,
): void {
  const { x, weight, out, width: d, eps } = a;
  const wasm = a.simd && d % 4 === 0 ? loadSimd() : null;
  if (wasm) return rmsNormSimd(wasm, x, null, null, weight, out, d, eps, r0, r1);
  // o is row r's first entry: indexing by r * d + i instead ran 1.5x slower in V8.
  for (let o = r0 * d; o < r1 * d; o += d) {
    let ss = 0;
    for (let i = o; i < o + d; i++) ss += x[i] * x[i];
    const inv = 1 / Math.sqrt(ss / d + eps);
    for (let i = 0; i < d; i++) out[o + i] = weight[i] * (x[o + i] * inv);
  }
}

/** sum = a + b, then out = rmsNorm(sum): the residual add fused with the next norm. */
function addRmsNorm(
  a: {
    a: Float32Array;
    b: Float32Array;
    weight: Float32Array;
    sum: Float32Array;
    out: Float32Array;
    width: number;
    eps: number;
    simd: boolean;
  },
  r0: number,
  r1: number,
): void {
  const d = a.width, wasm = a.simd && d % 4 === 0 ? loadSimd() : null;
  if (wasm) return rmsNormSimd(wasm, a.a, a.b, a.sum, a.weight, a.out, d, a.eps, r0, r1);
  for (let i = r0 * d; i < r1 * d; i++) a.sum[i] = a.a[i] + a.b[i];
  const norm = { x: a.sum, weight: a.weight, out: a.out, width: d, eps: a.eps, simd: false };
  rmsNorm(norm, r0, r1);
}

/**
 * simd.wat's rms_norm over rows r0..r1 of width d (a multiple of 4): out = rmsNorm(x), or
 * with b, sum = x + b and out = rmsNorm(sum) (addRmsNorm).
 */
function rmsNormSimd(
  wasm: SimdKernels,
  x: Float32Array,
  b: Float32Array | null,
  sum: Float32Array | null,
  weight: Float32Array,
  out: Float32Array,
  d: number,
  eps: number,
  r0: number,
  r1: number,
): void {
  // weight | x | b | sum | out, `rows` rows each
  const rows = rowsPerCopy(d), heap = wasm.heap((4 * rows + 1) * d);
  const at = (i: number) => (i * rows + 1) * d;
  heap.set(weight);
  for (let r = r0, n; r < r1; r += n) {
    n = Math.min(rows, r1 - r);
    heap.set(x.subarray(r * d, (r + n) * d), at(0));
    if (b) heap.set(b.subarray(r * d, (r + n) * d), at(1));
    wasm.rmsNorm(4 * at(0), b ? 4 * at(1) : 0, 4 * at(2), 0, 4 * at(3), n, d, eps);
    sum?.set(heap.subarray(at(2), at(2) + n * d), r * d);
    out.set(heap.subarray(at(3), at(3) + n * d), r * d);
  }
}

function silu(x: number): number {
  return x / (1 + exp(-x));
}

/**
 * silu(gate) * up from a gateUp matmul output [R, 2W] (gate and up columns interleaved
 * in runs of GATE_UP_RUN, see ExpertStacks) -> out [R, W]: what the fused kernels compute.
 * simd: in f32 WebAssembly lanes (within a few f32 ulps), else in JS doubles.
 */
function swiglu(
  a: { gateUp: Float32Array; out: Float32Array; width: number; simd: boolean },
  r0: number,
  r1: number,
): void {
  const { gateUp, out, width } = a;
  const wasm = a.simd ? loadSimd() : null;
  if (wasm) {
    const chunk = SIMD_SWIGLU_CHUNK, heap = wasm.heap(3 * chunk); // gate|up runs, then outputs
    for (let c0 = r0 * width; c0 < r1 * width; c0 += chunk) {
      const n = Math.min(chunk, r1 * width - c0); // whole runs: width is a multiple of them
      heap.set(gateUp.subarray(2 * c0, 2 * (c0 + n)));
      wasm.swiglu(0, 8 * chunk, n / GATE_UP_RUN);
      out.set(heap.subarray(2 * chunk, 2 * chunk + n), c0);
    }
    return;
  }
  // Output c of run c / GATE_UP_RUN reads gate 2c - c % GATE_UP_RUN of its row; its up
  // value is a run later. Walked run by run: this pass is as hot as the matmul before it.
  for (
    let c0 = r0 * width, g0 = 2 * c0;
    c0 < r1 * width;
    c0 += GATE_UP_RUN, g0 += 2 * GATE_UP_RUN
  ) {
    for (let j = 0; j < GATE_UP_RUN; j++) {
      out[c0 + j] = silu(gateUp[g0 + j]) * gateUp[g0 + GATE_UP_RUN + j];
    }
  }
}

/**
 * Backward of swiglu on rows r0..r1: dy [R, W] -> out [R, 2W], dGate and dUp interleaved
 * in the gateUp product's runs. In JS doubles: next to the grouped matmuls around it
 * (once a MoE layer a training step) this pass is small.
 */
function swigluGateUpBackward(
  a: { gateUp: Float32Array; dy: Float32Array; out: Float32Array; width: number },
  r0: number,
  r1: number,
): void {
  const { gateUp, dy, out, width } = a;
  for (
    let c0 = r0 * width, g0 = 2 * c0;
    c0 < r1 * width;
    c0 += GATE_UP_RUN, g0 += 2 * GATE_UP_RUN
  ) {
    for (let j = 0; j < GATE_UP_RUN; j++) {
      const g = gateUp[g0 + j], d = dy[c0 + j];
      // d silu(g)/dg = sig (1 + g (1 - sig))
      const sig = 1 / (1 + exp(-g));
      out[g0 + j] = d * gateUp[g0 + GATE_UP_RUN + j] * sig * (1 + g * (1 - sig));
      out[g0 + GATE_UP_RUN + j] = d * g * sig;
    }
  }
}

/**
 * silu(gate) * up over entries i0..i1 of gate and up apart (experts run one by one, and
 * compressed experts, whose gate and up inputs differ);
 * with `dy`, its backward instead: dGate and dUp. simd: as in swiglu; a tail of fewer
 * than 4 entries runs in JS.
 */
function swigluApart(
  a: {
    gate: Float32Array;
    up: Float32Array;
    out: Float32Array;
    dy?: Float32Array;
    dUp?: Float32Array;
    simd: boolean;
  },
  i0: number,
  i1: number,
): void {
  const { gate, up, out, dy, dUp } = a;
  const wasm = a.simd ? loadSimd() : null;
  let i = i0;
  if (wasm) {
    const chunk = SIMD_SWIGLU_CHUNK, heap = wasm.heap(3 * chunk);
    while (i + 4 <= i1) {
      const n = Math.min(chunk, (i1 - i) & ~3);
      heap.set(gate.subarray(i, i + n)), heap.set(up.subarray(i, i + n), chunk);
      if (dy) {
        heap.set(dy.subarray(i, i + n), 2 * chunk);
        wasm.swigluApartBackward(0, 4 * chunk, 8 * chunk, n / 4);
        out.set(heap.subarray(0, n), i), dUp!.set(heap.subarray(chunk, chunk + n), i);
      } else {
        wasm.swigluApart(0, 4 * chunk, 8 * chunk, n / 4);
        out.set(heap.subarray(2 * chunk, 2 * chunk + n), i);
      }
      i += n;
    }
  }
  for (; i < i1; i++) {
    const g = gate[i];
    if (!dy) {
      out[i] = silu(g) * up[i];
      continue;
    }
    // d silu(g)/dg = sig (1 + g (1 - sig))
    const sig = 1 / (1 + exp(-g));
    out[i] = dy[i] * up[i] * sig * (1 + g * (1 - sig));
    dUp![i] = dy[i] * g * sig;
  }
}

/**
 * Causal (optionally windowed) softmax in place of score rows [.., kvLen] stacked qLen per
 * (sequence, head): row i of each block sees keys lo .. pos (pos = kvLen - qLen + i); only
 * those are exponentiated and normalised, the others become 0. simd: as in swiglu.
 */
function softmaxVisible(
  a: { scores: Float32Array; qLen: number; kvLen: number; window: number | null; simd: boolean },
  r0: number,
  r1: number,
): void {
  const { scores, qLen, kvLen, window } = a;
  const wasm = a.simd ? loadSimd() : null;
  if (wasm) {
    // Rows of one (sequence, head) block at a time, so their positions run consecutively.
    const perCopy = Math.max(1, Math.floor(SIMD_SOFTMAX_CHUNK / kvLen));
    const heap = wasm.heap(perCopy * kvLen);
    for (let r = r0, n; r < r1; r += n) {
      n = Math.min(r1 - r, perCopy, qLen - (r % qLen));
      heap.set(scores.subarray(r * kvLen, (r + n) * kvLen));
      wasm.softmaxCausal(0, n, kvLen, kvLen - qLen + (r % qLen), window ?? 0);
      scores.set(heap.subarray(0, n * kvLen), r * kvLen);
    }
    return;
  }
  for (let r = r0; r < r1; r++) {
    const pos = kvLen - qLen + (r % qLen);
    const lo = window === null ? 0 : Math.max(0, pos - window + 1);
    const a = r * kvLen + lo, z = r * kvLen + pos; // the visible entries
    scores.fill(0, r * kvLen, a);
    scores.fill(0, z + 1, (r + 1) * kvLen);
    let max = -Infinity;
    for (let j = a; j <= z; j++) if (scores[j] > max) max = scores[j];
    let sum = 0;
    for (let j = a; j <= z; j++) sum += scores[j] = exp(scores[j] - max);
    for (let j = a; j <= z; j++) scores[j] /= sum;
  }
}

/**
 * One AdamW step over entries i0..i1 of a parameter, in place with its moments m and v:
 * torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments). simd: in f32
 * lanes as torch computes on f32 tensors (within 1e-6 of the JS doubles, tested), with a
 * JS tail of fewer than 4 entries.
 */
function adamw(
  a: {
    p: Float32Array;
    g: Float32Array;
    m: Float32Array;
    v: Float32Array;
    hp: AdamWHyper;
    simd: boolean;
  },
  i0: number,
  i1: number,
): void {
  const { p, g, m, v } = a, { lr, beta1, beta2, eps, weightDecay, gradScale, step } = a.hp;
  const bc1 = 1 - beta1 ** step, bc2 = 1 - beta2 ** step;
  const wasm = a.simd ? loadSimd() : null;
  let i = i0;
  if (wasm) {
    const chunk = SIMD_ROWS_CHUNK, heap = wasm.heap(4 * chunk); // p | g | m | v
    while (i + 4 <= i1) {
      const n = Math.min(chunk, (i1 - i) & ~3);
      heap.set(p.subarray(i, i + n)), heap.set(g.subarray(i, i + n), chunk);
      heap.set(m.subarray(i, i + n), 2 * chunk), heap.set(v.subarray(i, i + n), 3 * chunk);
      wasm.adamw(
        0,
        4 * chunk,
        8 * chunk,
        12 * chunk,
        n / 4,
        lr,
        beta1,
        1 - beta1,
        beta2,
        1 - beta2,
        eps,
        weightDecay,
        gradScale,
        bc1,
        bc2,
      );
      p.set(heap.subarray(0, n), i);
      m.set(heap.subarray(2 * chunk, 2 * chunk + n), i);
      v.set(heap.subarray(3 * chunk, 3 * chunk + n), i);
      i += n;
    }
  }
  for (; i < i1; i++) {
    const gi = gradScale * g[i];
    m[i] = beta1 * m[i] + (1 - beta1) * gi;
    v[i] = beta2 * v[i] + (1 - beta2) * gi * gi;
    const update = m[i] / bc1 / (Math.sqrt(v[i] / bc2) + eps);
    p[i] -= lr * (weightDecay * p[i] + update);
  }
}

/** dS = P * (dP - rowsum(P * dP)) in place of dP: the softmax's backward, rows of `width`. */
function softmaxBackward(
  a: { p: Float32Array; dp: Float32Array; width: number },
  r0: number,
  r1: number,
): void {
  const { p, dp, width } = a;
  for (let o = r0 * width; o < r1 * width; o += width) {
    let pdp = 0;
    for (let j = o; j < o + width; j++) pdp += p[j] * dp[j];
    for (let j = o; j < o + width; j++) dp[j] = p[j] * (dp[j] - pdp);
  }
}

/**
 * out[r] += sum_j scales[r, j] * y[sources[r, j]]: routed expert outputs back to tokens.
 * simd (widths a multiple of 4): f32 lanes, each product rounded before its add.
 */
function combine(
  a: {
    out: Float32Array;
    y: Float32Array;
    sources: Int32Array;
    scales: Float32Array;
    k: number;
    width: number;
    simd: boolean;
  },
  r0: number,
  r1: number,
): void {
  const { out, y, sources, scales, k, width: h } = a;
  const wasm = a.simd && h % 4 === 0 ? loadSimd() : null;
  if (wasm) {
    // out rows | their k y rows each | scales
    const rows = Math.max(1, Math.floor(rowsPerCopy(h) / k));
    const heap = wasm.heap(rows * (k + 1) * h + rows * k), ys = rows * h, sc = rows * (k + 1) * h;
    for (let r = r0, n; r < r1; r += n) {
      n = Math.min(rows, r1 - r);
      heap.set(out.subarray(r * h, (r + n) * h));
      for (let i = 0; i < n * k; i++) {
        const src = sources[r * k + i] * h;
        heap.set(y.subarray(src, src + h), ys + i * h);
      }
      heap.set(scales.subarray(r * k, (r + n) * k), sc);
      wasm.combine(0, 4 * ys, 4 * sc, n, k, h);
      out.set(heap.subarray(0, n * h), r * h);
    }
    return;
  }
  for (let r = r0; r < r1; r++) {
    for (let j = 0; j < k; j++) {
      const src = sources[r * k + j] * h, s = scales[r * k + j];
      for (let c = 0; c < h; c++) out[r * h + c] += s * y[src + c];
    }
  }
}

/**
 * HF rotate_half RoPE of `heads` heads read from columns c0.. of the rows of src (row
 * width srcWidth) into out [rows, heads * headDim], row r at positions[r]. sinSign -1
 * rotates back: the transpose, which is ropeBackward. simd (headDim a multiple of 8): in
 * f32 lanes with f32 cos and sin, HF's own arithmetic.
 */
function rotateHeads(
  a: {
    src: Float32Array;
    srcWidth: number;
    c0: number;
    out: Float32Array;
    heads: number;
    headDim: number;
    positions: Int32Array;
    theta: number;
    linearFactor: number;
    sinSign: 1 | -1;
    simd: boolean;
  },
  r0: number,
  r1: number,
): void {
  const { src, srcWidth, c0, out, heads, headDim, positions, sinSign } = a;
  const width = heads * headDim, half = headDim / 2;
  const table = ropeTable(headDim, a.theta, a.linearFactor);
  const wasm = a.simd && headDim % 8 === 0 ? loadSimd() : null;
  if (wasm) {
    // rows | their cos and signed sin values (f32, per position)
    const rows = rowsPerCopy(width), heap = wasm.heap(rows * (width + headDim));
    for (let r = r0, n; r < r1; r += n) {
      n = Math.min(rows, r1 - r);
      for (let i = 0; i < n; i++) {
        const x = (r + i) * srcWidth + c0;
        heap.set(src.subarray(x, x + width), i * width);
        heap.set(table.lanes(positions[r + i], sinSign), rows * width + i * headDim);
      }
      wasm.rope(0, 4 * rows * width, n, heads, headDim);
      out.set(heap.subarray(0, n * width), r * width);
    }
    return;
  }
  for (let r = r0; r < r1; r++) {
    const [cos, sin] = table.doubles(positions[r]);
    for (let h = 0; h < heads; h++) {
      const o = r * width + h * headDim, x = r * srcWidth + c0 + h * headDim;
      for (let i = 0; i < half; i++) {
        const p = src[x + i], q = src[x + i + half], sn = sinSign * sin[i];
        out[o + i] = p * cos[i] - q * sn;
        out[o + i + half] = q * cos[i] + p * sn;
      }
    }
  }
}

interface RopeTable {
  /** cos and sin of each frequency at a position, in doubles (the JS loops). */
  doubles(position: number): [Float64Array, Float64Array];
  /** The same as one f32 row [cos | sinSign * sin] (the SIMD kernel). */
  lanes(position: number, sinSign: 1 | -1): Float32Array;
}

let lastRopeTable: { key: string; table: RopeTable } | null = null;

/**
 * cos/sin per distinct position (positions repeat across the batch), with HF's f32
 * inv_freq = 1 / theta^(2i/d) and f32 angle, for rotateHeads. The last table is kept:
 * every layer's q and k use the same one, and building it cost as much as the rotation.
 */
function ropeTable(headDim: number, theta: number, linearFactor: number): RopeTable {
  const key = `${headDim} ${theta} ${linearFactor}`;
  if (lastRopeTable?.key === key) return lastRopeTable.table;
  const half = headDim / 2;
  const invFreq = Array.from(
    { length: half },
    (_, i) => Math.fround(1 / Math.fround(theta ** ((2 * i) / headDim))),
  );
  const doubles = new Map<number, [Float64Array, Float64Array]>();
  const lanes = [new Map<number, Float32Array>(), new Map<number, Float32Array>()];
  const table: RopeTable = {
    doubles(position) {
      let cs = doubles.get(position);
      if (!cs) {
        const pos = position / linearFactor;
        cs = [new Float64Array(half), new Float64Array(half)];
        for (let i = 0; i < half; i++) {
          const angle = Math.fround(pos * invFreq[i]);
          cs[0][i] = Math.cos(angle), cs[1][i] = Math.sin(angle);
        }
        doubles.set(position, cs);
      }
      return cs;
    },
    lanes(position, sinSign) {
      const cached = lanes[sinSign === 1 ? 0 : 1];
      let row = cached.get(position);
      if (!row) {
        const [cos, sin] = table.doubles(position);
        row = new Float32Array(headDim);
        for (let i = 0; i < half; i++) row[i] = cos[i], row[half + i] = sinSign * sin[i];
        cached.set(position, row);
      }
      return row;
    },
  };
  lastRopeTable = { key, table };
  return table;
}

// Scratch for one row's exponentials, so each element costs one exp (the divergence loop is
// the largest part of the fast expert search once matmuls are BLAS-fast).
let expScratch = new Float64Array(0);
function expsOf(
  cond: Float32Array,
  o: number,
  dim: number,
): { e: Float64Array; sum: number; max: number } {
  if (expScratch.length < dim) expScratch = new Float64Array(dim);
  const e = expScratch;
  let max = -Infinity;
  for (let i = 0; i < dim; i++) if (cond[o + i] > max) max = cond[o + i];
  let sum = 0;
  for (let i = 0; i < dim; i++) sum += e[i] = exp(cond[o + i] - max);
  return { e, sum, max };
}

/**
 * JS(P||Q) with Q = softmax(cond row) + eps; P precomputed with its sum p log p.
 * log q comes without a Math.log where eps is negligible: q = s + eps with s = e / sum,
 * so log q = log s + log1p(eps / s) and log s = (x - max) - log(sum); the series
 * t - t^2/2 + t^3/3 for log1p(t) is exact to f64 rounding below t = 1e-5. One exp and
 * one log per entry instead of one exp and two: this loop dominated the searches.
 */
function jsRow(
  p: Float32Array,
  plogp: number,
  cond: Float32Array,
  o: number,
  dim: number,
  eps: number,
) {
  const { e, sum, max } = expsOf(cond, o, dim);
  const inv = 1 / sum, logSum = Math.log(sum);
  let qlogq = 0, mlogm = 0;
  for (let i = 0; i < dim; i++) {
    const s = e[i] * inv, q = s + eps, t = eps / s;
    const logq = t < 1e-5 ? cond[o + i] - max - logSum + t * (1 - t * (0.5 - t / 3)) : Math.log(q);
    const m = 0.5 * (p[o + i] + q);
    qlogq += q * logq;
    mlogm += m * Math.log(m);
  }
  // 0.5 KL(P||M) + 0.5 KL(Q||M) = 0.5 (sum p log p + sum q log q) - sum m log m
  return Math.max(0, 0.5 * (plogp + qlogq) - mlogm);
}

/**
 * The searches' Jensen-Shannon divergence (lib/methods/divergence.ts) of rows r0..r1:
 * out[r] = JS(P||Q), Q = softmax(cond row) + eps, against P's f32 rows and each row's sum
 * p ln p. A row kernel so that its rows split between threads: it was most of the expert
 * search, one thread busy while BLAS's idled. simd (dim a multiple of 4): simd.wat's
 * js_rows, jsRow in f64 lanes with its own e^x and ln x (within 1e-9 relative of jsRow,
 * or 1e-14 absolute for near-uniform rows; tests/divergence_test.ts).
 */
function jsDivergence(
  a: {
    p: Float32Array;
    plogp: Float64Array;
    cond: Float32Array;
    out: Float64Array;
    dim: number;
    eps: number;
    simd: boolean;
  },
  r0: number,
  r1: number,
): void {
  const { p, plogp, cond, out, dim, eps } = a;
  const wasm = a.simd && dim % 4 === 0 ? loadSimd() : null;
  if (wasm) {
    // bytes: P rows | candidate rows | their p ln p (f64) | JS out (f64) | a row of e^x (f64)
    const rows = Math.max(1, Math.floor(4 * SIMD_ROWS_CHUNK / dim));
    const condAt = 4 * rows * dim, plogpAt = 8 * rows * dim, outAt = plogpAt + 8 * rows;
    const expAt = outAt + 8 * rows;
    const heap = wasm.heap((expAt + 8 * dim) / 4), f64 = new Float64Array(heap.buffer);
    for (let r = r0, n; r < r1; r += n) {
      n = Math.min(rows, r1 - r);
      heap.set(p.subarray(r * dim, (r + n) * dim));
      heap.set(cond.subarray(r * dim, (r + n) * dim), condAt / 4);
      f64.set(plogp.subarray(r, r + n), plogpAt / 8);
      wasm.jsRows(0, plogpAt, condAt, outAt, expAt, n, dim, eps);
      out.set(f64.subarray(outAt / 8, outAt / 8 + n), r);
    }
    return;
  }
  for (let r = r0; r < r1; r++) out[r] = jsRow(p, plogp[r], cond, r * dim, dim, eps);
}

export const rowKernels = {
  rmsNorm,
  addRmsNorm,
  swiglu,
  swigluGateUpBackward,
  swigluApart,
  softmaxVisible,
  softmaxBackward,
  adamw,
  combine,
  rotateHeads,
  jsDivergence,
  gemm: gemmPart,
};
export type RowKernel = keyof typeof rowKernels;
type Args<K extends RowKernel> = Parameters<(typeof rowKernels)[K]>[0];

/** A job for a worker thread: rows r0..r1 of one kernel. */
export interface RowJob {
  kernel: RowKernel;
  args: Args<RowKernel>;
  r0: number;
  r1: number;
}

// The threads' shared state. status[0]: jobs finished in the current run; status[1]:
// workers started; status[2]: the length of the first failed job's message, stored in
// the bytes after the first 16; status[3]: set by the worker that claims that space.
const STATUS_BYTES = 16 + 4096;

// Below this many row elements, handing rows over (0.1-0.3 ms measured) costs more than it saves.
const MIN_SPLIT_ELEMENTS = 1 << 16;
const START_TIMEOUT_MS = 30_000;

// Thread cap: each worker is a V8 isolate (memory), and a pass split finer than 8 ways is
// mostly hand-over at this project's model sizes.
const MAX_THREADS = 8;

/** One thread a core the runtime reports, at most MAX_THREADS. */
export function coreThreads(): number {
  return Math.min(navigator.hardwareConcurrency, MAX_THREADS);
}

/**
 * coreThreads, but one thread on a machine of 2 cores or fewer, or MOE_CONDENSE_THREADS.
 * On 2 cores OpenBLAS's own thread holds the second core, and a worker there cost more
 * than it saved, measured on this project's 2-core CI VMs (interleaved): one thread ran the
 * forward 5-11% faster, a training step 3-16%, and `deno task search` in the same time.
 */
export function defaultThreads(): number {
  const env = Deno.env.get("MOE_CONDENSE_THREADS");
  if (env === undefined) return navigator.hardwareConcurrency <= 2 ? 1 : coreThreads();
  if (!/^[1-9][0-9]*$/.test(env)) {
    throw new Error(`MOE_CONDENSE_THREADS must be a positive integer, got "${env}"`);
  }
  return Number(env);
}

/** A Float32Array in shared memory, so worker threads can read and write it in place. */
export function sharedFloats(n: number): Float32Array {
  return new Float32Array(new SharedArrayBuffer(n * 4));
}

/**
 * Runs row kernels on `threads` threads: the main thread takes the first share of the
 * rows and worker threads the rest, over SharedArrayBuffers. Blocks until all are done,
 * so the backend's ops stay synchronous. Workers start on first use and never keep the
 * process alive.
 */
export class RowThreads {
  // Jobs go over a web MessageChannel per worker: Deno's node:worker_threads postMessage
  // took time linear in the size of the SharedArrayBuffers it passes (560 ms for 16 MiB,
  // against 0.06 ms on a web port).
  private ports: MessagePort[] = [];
  private readonly status = new Int32Array(new SharedArrayBuffer(STATUS_BYTES));

  constructor(readonly threads: number) {
    if (!Number.isInteger(threads) || threads < 1) {
      throw new Error(`threads must be a positive integer, got ${threads}`);
    }
  }

  private static pools = new Map<number, RowThreads>();

  /**
   * One pool per thread count for the whole process (backends and the searches'
   * divergences), rather than a set of workers each: runs block the main thread, so
   * they never overlap.
   */
  static shared(threads: number): RowThreads {
    let pool = RowThreads.pools.get(threads);
    if (!pool) RowThreads.pools.set(threads, pool = new RowThreads(threads));
    return pool;
  }

  /**
   * kernel over rows 0..rows of rowElements each; `writes` are the arrays it writes. Runs
   * on one thread when the work is small or a written array is not shared (a worker would
   * write into its copy).
   */
  run<K extends RowKernel>(
    kernel: K,
    args: Args<K>,
    rows: number,
    rowElements: number,
    writes: readonly (Float32Array | Float64Array)[],
  ): void {
    const parts = Math.min(this.threads, rows);
    const run = rowKernels[kernel] as (a: Args<K>, r0: number, r1: number) => void;
    if (
      parts < 2 || rows * rowElements < MIN_SPLIT_ELEMENTS ||
      writes.some((x) => !(x.buffer instanceof SharedArrayBuffer))
    ) return run(args, 0, rows);
    this.start(parts - 1);
    // An array outside shared memory would be cloned into each message, with all of the
    // buffer it views (for a weight, the whole checkpoint read): share a copy of it instead.
    const shared = { ...args } as Record<string, unknown>;
    for (const [name, value] of Object.entries(shared)) {
      if (ArrayBuffer.isView(value) && !(value.buffer instanceof SharedArrayBuffer)) {
        const array = value as Float32Array | Int32Array;
        const copy = new (array.constructor as Float32ArrayConstructor)(
          new SharedArrayBuffer(array.byteLength),
        );
        copy.set(array);
        shared[name] = copy;
      }
    }
    const bound = (i: number) => Math.round((rows * i) / parts);
    const status = this.status;
    Atomics.store(status, 0, 0);
    // Jobs handed over are in flight: wait for them even if a hand-over or this thread's
    // rows throw, so the next run starts from a clean count.
    let posted = 0, ownError: unknown = null;
    try {
      for (let i = 1; i < parts; i++) {
        const job = { kernel, args: shared, r0: bound(i), r1: bound(i + 1) } as RowJob;
        this.ports[i - 1].postMessage(job);
        posted++;
      }
      run(args, 0, bound(1));
    } catch (e) {
      ownError = e;
    }
    for (let done; (done = Atomics.load(status, 0)) < posted;) Atomics.wait(status, 0, done);
    const errorLength = Atomics.load(status, 2);
    const workerError = errorLength > 0 &&
      new TextDecoder().decode(new Uint8Array(status.buffer, 16, errorLength).slice());
    Atomics.store(status, 2, 0), Atomics.store(status, 3, 0);
    if (ownError) throw ownError;
    if (workerError) throw new Error(`CPU worker thread failed in ${kernel}: ${workerError}`);
  }

  private start(count: number): void {
    if (this.ports.length >= count) return;
    const url = new URL("./cpu_rows_worker.ts", import.meta.url);
    while (this.ports.length < count) {
      const { port1, port2 } = new MessageChannel();
      // A node:worker_threads Worker, not a web one: unref() lets a finished script exit.
      const worker = new Worker(url, {
        workerData: { status: this.status, port: port2 },
        transferList: [port2 as never],
      });
      worker.unref();
      this.ports.push(port1);
    }
    // Fail clearly, not hang, if a worker cannot start (its module fails to load).
    const t0 = performance.now();
    for (let up; (up = Atomics.load(this.status, 1)) < count;) {
      if (performance.now() - t0 > START_TIMEOUT_MS) {
        throw new Error(`${count - up} CPU worker thread(s) did not start within 30 s (${url})`);
      }
      Atomics.wait(this.status, 1, up, 100);
    }
  }
}
