// CPU backend. Its reference mode is plain f32 loops, written to be obviously right, with
// sums in JS doubles, so at least as accurate as f32 PyTorch. By default matmuls run in
// BLAS (without it, in WebAssembly SIMD: wasm_gemm.ts), and the elementwise passes
// (cpu_rows.ts) over worker threads, most in f32 WebAssembly SIMD lanes; each is tested against the reference. Freed arrays are reused.
// Weights are widened to f32 once on upload (the layer-wise mode keeps only one layer
// resident).
//
// CpuBackend adds the training ops (BackwardOps in backend.ts) to CpuForward's memory and
// forward ops (cpu_forward.ts).

import { exp } from "./exp.ts";
import { sharedFloats } from "./cpu_rows.ts";
import { type RawTensor, toFloat32 } from "../io/safetensors.ts";
import {
  type AdamWHyper,
  type AttentionShape,
  checkAttentionBackward,
  checkGateUp,
  checkGrouped,
  numelOf,
  type Routing,
  rowsCols,
  type Tensor,
  type TrainingBackend,
  type Weight,
} from "./backend.ts";
import {
  attentionPairs,
  CpuForward,
  CpuTensor,
  CpuWeight,
  t,
  topKIndices,
  w,
} from "./cpu_forward.ts";
export { CpuTensor, CpuWeight, topKIndices };
export type { CpuOptions } from "./cpu_forward.ts";

export class CpuBackend extends CpuForward implements TrainingBackend {
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
