// What only training needs beyond the ops' backward passes: trainable f32 master weights,
// gradient sums, the cross-entropy loss and the AdamW step (kernels/loss.wgsl, adamw.wgsl). The
// backward ops follow BackwardOps in backend.ts.

import { type RawTensor, toFloat32 } from "../../io/safetensors.ts";
import { type AdamWHyper, numelOf, rowsCols, type Tensor, type Weight } from "../backend.ts";
import { WebGpuMoe } from "./moe.ts";
import { ceilDiv, DTYPE_BYTES, t, w, weightRows } from "./tensors.ts";

export class WebGpuTraining extends WebGpuMoe {
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
}
