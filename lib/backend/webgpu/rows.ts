// Ops a row or an entry at a time, forward and backward: embedding, argmax, RMSNorm,
// elementwise and SwiGLU, the searches' divergence, the bench's FMA probe
// (kernels/embedding, argmax, norm*, elementwise*, divergence, roofline, moe_backward.wgsl).

import {
  checkAddRmsNorm,
  checkGateUp,
  GATE_UP_RUN,
  numelOf,
  rowsCols,
  type Tensor,
  type Weight,
} from "../backend.ts";
import { MAX_WORKGROUPS_PER_DIM, WebGpuCore } from "./core.ts";
import { ceilDiv, DTYPE_CODE, type GpuTensor, t, w } from "./tensors.ts";

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

export class WebGpuRowOps extends WebGpuCore {
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

  protected sameSize(op: string, a: Tensor, b: Tensor): void {
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

  protected checkRows(op: string, rows: Int32Array, limit: number): void {
    for (const r of rows) {
      if (r < 0 || r >= limit) throw new Error(`${op}: row ${r} out of range [0, ${limit})`);
    }
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
}
