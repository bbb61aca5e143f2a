// Routed experts: top-k routing, the expert plan (grouped on the device), the grouped gate|up
// and down matmuls, compressed experts, and the row gathers and scatters around them,
// forward and backward (kernels/moe.wgsl, moe_backward.wgsl).

import {
  checkCombine,
  checkRoutedExperts,
  type CompressedRouteSpec,
  expertPlan,
  type ExpertStacks,
  numelOf,
  type RouteSpec,
  type Routing,
  rowsCols,
  type SeparateExpertStacks,
  type Tensor,
  type Weight,
} from "../backend.ts";
import { WebGpuAttention } from "./attention.ts";
import { MAX_WORKGROUPS_PER_DIM } from "./core.ts";
import { groupStarts } from "./matmul.ts";
import { ceilDiv, type GpuTensor, t } from "./tensors.ts";

// Most experts kernels/moe.wgsl plan_experts groups on the device (its PLAN_MAX_EXPERTS).
const PLAN_MAX_EXPERTS = 1024;
// Most routed (token, expert) pairs it groups. Its one workgroup is meant for decode-sized
// batches: each expert's thread scans every pair about 3 times, so a large prefill would
// run long on one workgroup (and past llvmpipe's silent cap of 65,535 loop iterations a
// thread). Larger batches take plan_count, plan_scan and plan_place: a workgroup per
// PLAN_CHUNK tokens, three dispatches instead of one.
const PLAN_MAX_ENTRIES = 16384;
const PLAN_CHUNK = 256;

/** The grouped rows of plan_experts (or expertPlan uploaded), in device buffers. */
type DevicePlan = Record<"groupStart" | "order" | "sources" | "scales", GPUBuffer>;

/**
 * The rows a group can be expected to hold, for the grouped tile size (any size is
 * correct: the grid covers every tile): twice the mean n k / E, as routing is uneven, and
 * no more than n (a token picks an expert once). The same where the host plans, so that
 * both plans run the same kernels and give the same sums.
 */
function groupRowsHint(n: number, k: number, experts: number): number {
  return Math.min(n, Math.ceil((2 * n * k) / experts));
}

export class WebGpuMoe extends WebGpuAttention {
  async routeTopK(logits: Tensor, k: number, normalize: boolean, eps: number): Promise<Routing> {
    const [n] = rowsCols(logits);
    const result = this.route(logits, { k, normalize, eps });
    const packed = await this.read(result);
    this.free(result);
    const bits = new Int32Array(packed.buffer);
    const indices = new Int32Array(n * k), weights = new Float32Array(n * k);
    for (let r = 0; r < n; r++) {
      indices.set(bits.subarray(r * 2 * k, r * 2 * k + k), r * k);
      weights.set(packed.subarray(r * 2 * k + k, (r + 1) * 2 * k), r * k);
    }
    return { indices, weights };
  }

  /** The routing on the device, [tokens, 2k]: k expert ids, then k weights as f32 bits. */
  private route(logits: Tensor, { k, normalize, eps }: RouteSpec): GpuTensor {
    const [n, e] = rowsCols(logits);
    if (k < 1 || k > e) throw new Error(`routeTopK: k = ${k} with ${e} experts`);
    const result = this.newTensor([n, 2 * k]);
    for (const [r0, rows] of this.rowChunks(n, [e * 4, 2 * k * 4])) {
      const inRange = this.rowRange(t(logits).buffer, r0, rows, e * 4);
      const outRange = this.rowRange(result.buffer, r0, rows, 2 * k * 4, true);
      this.run({
        kernel: "moe",
        entry: "route_topk",
        params: [rows, e, k, normalize ? 1 : 0, { f32: eps }, inRange.skip, outRange.skip],
        bindings: [inRange, outRange],
        workgroups: ceilDiv(rows, 64),
      });
    }
    return result;
  }

  async routedExperts(
    xn: Tensor,
    logits: Tensor,
    stacks: ExpertStacks,
    route: RouteSpec,
    out: Tensor,
  ): Promise<void> {
    checkRoutedExperts(xn, logits, stacks, route, out);
    const [n, e] = rowsCols(logits), k = route.k;
    if (n === 0) return;
    let plan: DevicePlan;
    if (this.devicePlanFits(n, e, k)) {
      // Route and group on the device: nothing waits on the host.
      const routed = this.route(logits, route);
      plan = this.planOn(routed, n, e, k);
      this.free(routed);
    } else {
      // Routing over one binding (test-sized limits, or a batch of millions of tokens), or
      // over PLAN_MAX_EXPERTS experts: the same plan, grouped on the host.
      const host = expertPlan(await this.routeTopK(logits, k, route.normalize, route.eps), k, e);
      plan = {
        groupStart: this.upload(groupStarts(host.groupRows)),
        order: this.upload(host.order),
        sources: this.upload(host.sources),
        scales: this.upload(host.scales),
      };
    }
    const hint = groupRowsHint(n, k, e);
    // The gate|up matmul reads xn's rows through the plan's order where xn fits one binding.
    let a: GpuTensor;
    if (t(xn).bytes <= this.maxBindingBytes) {
      const gather = { rows: plan.order, count: n * k };
      a = this.groupedOn(xn, stacks.gateUp, plan.groupStart, hint, true, gather);
    } else {
      const xe = this.gatherFrom(xn, plan.order, n * k);
      a = this.groupedOn(xe, stacks.gateUp, plan.groupStart, hint, true);
      this.free(xe);
    }
    const y = this.groupedOn(a, stacks.down, plan.groupStart, hint);
    this.free(a);
    this.combineFrom(out, y, plan.sources, plan.scales, k);
    this.free(y);
    for (const buffer of Object.values(plan)) this.release(buffer);
  }

  /** Whether n tokens' k experts of e can be grouped on the device (planOn). */
  private devicePlanFits(n: number, e: number, k: number): boolean {
    const chunks = ceilDiv(n, PLAN_CHUNK);
    const fits = Math.max(n * 2 * k, e + 1, chunks * e) * 4 <= this.maxBindingBytes;
    return e <= PLAN_MAX_EXPERTS && chunks <= MAX_WORKGROUPS_PER_DIM && fits;
  }

  /**
   * The plan of a routing [n, 2k] in route_topk's layout, on the device: plan_experts, or
   * past PLAN_MAX_ENTRIES pairs plan_count, plan_scan and plan_place over chunks of
   * tokens (the same plan).
   */
  private planOn(routed: GpuTensor, n: number, e: number, k: number): DevicePlan {
    const plan = {
      groupStart: this.acquire((e + 1) * 4, true),
      order: this.acquire(n * k * 4, true),
      sources: this.acquire(n * k * 4, true),
      scales: this.acquire(n * k * 4, true),
    };
    const outputs = [
      { buffer: plan.order, write: true },
      { buffer: plan.sources, write: true },
      { buffer: plan.scales, write: true },
    ];
    const params = [n, e, k, 0], input = { buffer: routed.buffer };
    if (n * k <= PLAN_MAX_ENTRIES) {
      const bindings = [input, { buffer: plan.groupStart, write: true }, ...outputs];
      this.run({ kernel: "moe", entry: "plan_experts", params, bindings, workgroups: 1 });
      return plan;
    }
    const chunks = ceilDiv(n, PLAN_CHUNK);
    const first = this.acquire(chunks * e * 4, true); // [chunks, experts]
    const counts = { buffer: first, size: chunks * e * 4 };
    this.run({
      kernel: "moe",
      entry: "plan_count",
      params,
      bindings: [input, { ...counts, write: true }],
      workgroups: chunks,
    });
    this.run({
      kernel: "moe",
      entry: "plan_scan",
      params,
      bindings: [{ ...counts, write: true }, { buffer: plan.groupStart, write: true }],
      workgroups: 1,
    });
    this.run({
      kernel: "moe",
      entry: "plan_place",
      params,
      bindings: [input, counts, ...outputs],
      workgroups: chunks,
    });
    this.release(first);
    return plan;
  }

  /**
   * Compressed experts on the device (DeviceCompressedExperts): route_topk, split_compressed
   * (main routing and aux alphas), plan_experts over the main experts, theta as three
   * matmuls, then the main experts grouped as routedExperts runs them, gate and up apart
   * (their inputs differ) and both reading x * theta through the plan's order.
   */
  async compressedExperts(
    xn: Tensor,
    logits: Tensor,
    stacks: SeparateExpertStacks,
    ceSlots: () => Promise<readonly Weight[]>,
    route: CompressedRouteSpec,
    out: Tensor,
  ): Promise<boolean> {
    const [n, e] = rowsCols(logits), { k, mainExperts: km } = route;
    if (!Number.isInteger(km) || km < 1 || km >= k) {
      throw new Error(`compressedExperts: ${km} main experts of top-${k}`);
    }
    // x * theta is bound whole by the gathering matmuls, the alphas written whole.
    const fits = Math.max(t(xn).bytes, n * e * 4) <= this.maxBindingBytes;
    if (!fits || !this.devicePlanFits(n, e, k)) return false;
    if (n === 0) return true;
    const slots = await ceSlots(); // a trained ces is read here, before anything is recorded
    const raw = this.route(logits, { k, normalize: false, eps: 0 });
    const main = this.newTensor([n, 2 * km]), alpha = this.newTensor([n, e]);
    const overTopK = route.renormOver === "main" ? 0 : 1;
    this.run({
      kernel: "moe",
      entry: "split_compressed",
      params: [n, e, k, km, route.normalize ? 1 : 0, { f32: route.eps }, overTopK],
      bindings: [
        { buffer: raw.buffer },
        { buffer: main.buffer, write: true },
        { buffer: alpha.buffer, write: true },
      ],
      workgroups: ceilDiv(n, 64),
    });
    this.free(raw);
    const plan = this.planOn(main, n, e, km);
    this.free(main);
    const [t0, t1, t2] = slots.map((slot) => this.matmul(alpha, slot));
    const xg = this.mul(xn, t0), xu = this.mul(xn, t2);
    const hint = groupRowsHint(n, km, e), gather = { rows: plan.order, count: n * km };
    const g = this.groupedOn(xg, stacks.gate, plan.groupStart, hint, false, gather);
    const u = this.groupedOn(xu, stacks.up, plan.groupStart, hint, false, gather);
    const a = this.swiglu(g, u), t1Rows = this.gatherFrom(t1, plan.order, n * km);
    const scaled = this.mul(a, t1Rows);
    const y = this.groupedOn(scaled, stacks.down, plan.groupStart, hint);
    this.combineFrom(out, y, plan.sources, plan.scales, km);
    for (const x of [alpha, t0, t1, t2, xg, xu, g, u, a, t1Rows, scaled, y]) this.free(x);
    for (const buffer of Object.values(plan)) this.release(buffer);
    return true;
  }

  gatherRows(x: Tensor, rows: Int32Array): Tensor {
    this.checkRows("gatherRows", rows, rowsCols(x)[0]);
    const rowsBuf = this.upload(rows);
    const out = this.gatherFrom(x, rowsBuf, rows.length);
    this.release(rowsBuf);
    return out;
  }

  /** gatherRows with the `count` row ids in a device buffer. */
  private gatherFrom(x: Tensor, rows: GPUBuffer, count: number): GpuTensor {
    const [n, h] = rowsCols(x);
    const out = this.newTensor([count, h]); // [selected rows, hidden]
    // Source chunks x output chunks: each dispatch copies the selected rows that lie in
    // its source chunk.
    for (const [s0, srcRows] of this.rowChunks(n, [h * 4])) {
      const srcRange = this.rowRange(t(x).buffer, s0, srcRows, h * 4);
      for (const [i0, chunkCount] of this.rowChunks(count, [h * 4])) {
        const outRange = this.rowRange(out.buffer, i0, chunkCount, h * 4, true);
        this.run({
          kernel: "moe",
          entry: "gather_rows",
          params: [chunkCount, h, s0, srcRows, i0, srcRange.skip, outRange.skip],
          bindings: [{ buffer: rows }, srcRange, outRange],
          workgroups: ceilDiv(chunkCount * h, 64),
        });
      }
    }
    return out;
  }

  scatterAddRows(out: Tensor, y: Tensor, rows: Int32Array, scales: Float32Array): void {
    const [n, h] = rowsCols(out);
    this.checkRows("scatterAddRows", rows, n);
    if (numelOf(y.shape) !== rows.length * h || scales.length !== rows.length) {
      throw new Error(
        `scatterAddRows: y [${y.shape}], ${rows.length} rows, ${scales.length} scales`,
      );
    }
    const rowsBuf = this.upload(rows), scalesBuf = this.upload(scales);
    for (const [d0, dstRows] of this.rowChunks(n, [h * 4])) {
      const dstRange = this.rowRange(t(out).buffer, d0, dstRows, h * 4, true);
      for (const [i0, count] of this.rowChunks(rows.length, [h * 4])) {
        const yRange = this.rowRange(t(y).buffer, i0, count, h * 4);
        this.run({
          kernel: "moe",
          entry: "scatter_add_rows",
          params: [count, h, d0, dstRows, i0, yRange.skip, dstRange.skip],
          bindings: [{ buffer: rowsBuf }, { buffer: scalesBuf }, yRange, dstRange],
          workgroups: ceilDiv(count * h, 64),
        });
      }
    }
    this.release(rowsBuf);
    this.release(scalesBuf);
  }

  combineRows(out: Tensor, y: Tensor, sources: Int32Array, scales: Float32Array, k: number): void {
    checkCombine(rowsCols(out)[0], rowsCols(y)[0], sources, scales, k);
    const sourcesBuf = this.upload(sources), scalesBuf = this.upload(scales);
    this.combineFrom(out, y, sourcesBuf, scalesBuf, k);
    this.release(sourcesBuf);
    this.release(scalesBuf);
  }

  /** combineRows with the sources and scales in device buffers. */
  private combineFrom(out: Tensor, y: Tensor, sources: GPUBuffer, scales: GPUBuffer, k: number) {
    const [n, h] = rowsCols(out), [ny] = rowsCols(y);
    for (const [y0, yRows] of this.rowChunks(ny, [h * 4])) {
      const yRange = this.rowRange(t(y).buffer, y0, yRows, h * 4);
      for (const [r0, rows] of this.rowChunks(n, [h * 4])) {
        const outRange = this.rowRange(t(out).buffer, r0, rows, h * 4, true);
        this.run({
          kernel: "moe",
          entry: "combine_rows",
          params: [rows, h, k, r0, y0, yRows, yRange.skip, outRange.skip],
          bindings: [{ buffer: sources }, { buffer: scales }, yRange, outRange],
          workgroups: ceilDiv(rows * h, 64),
        });
      }
    }
  }

  scatterAddRowsBackward(
    dOut: Tensor,
    y: Tensor,
    rows: Int32Array,
    scales: Float32Array,
  ): { dy: Tensor; dScales: Tensor } {
    const [n, h] = rowsCols(dOut);
    this.checkRows("scatterAddRowsBackward", rows, n);
    if (numelOf(y.shape) !== rows.length * h || scales.length !== rows.length) {
      throw new Error(
        `scatterAddRowsBackward: y [${y.shape}], ${rows.length} rows, ${scales.length} scales`,
      );
    }
    const dy = this.newTensor([rows.length, h]); // [rows, H]
    const dScales = this.newTensor([rows.length]);
    const rowsBuf = this.upload(rows), scalesBuf = this.upload(scales);
    // dOut chunks x selected-row chunks, as gatherRows.
    for (const [s0, srcRows] of this.rowChunks(n, [h * 4])) {
      const srcRange = this.rowRange(t(dOut).buffer, s0, srcRows, h * 4);
      for (const [i0, count] of this.rowChunks(rows.length, [h * 4])) {
        const dyRange = this.rowRange(dy.buffer, i0, count, h * 4, true);
        this.run({
          kernel: "moe_backward",
          entry: "scatter_rows_backward_dy",
          params: [count, h, s0, srcRows, i0, srcRange.skip, dyRange.skip],
          bindings: [{ buffer: rowsBuf }, { buffer: scalesBuf }, srcRange, dyRange],
          workgroups: ceilDiv(count * h, 64),
        });
        const yRange = this.rowRange(t(y).buffer, i0, count, h * 4);
        this.run({
          kernel: "moe_backward",
          entry: "scatter_rows_backward_scales",
          params: [count, h, s0, srcRows, i0, srcRange.skip, yRange.skip],
          bindings: [
            { buffer: rowsBuf },
            yRange,
            srcRange,
            { buffer: dScales.buffer, size: rows.length * 4, write: true },
          ],
          workgroups: ceilDiv(count, 64),
        });
      }
    }
    this.release(rowsBuf);
    this.release(scalesBuf);
    return { dy, dScales };
  }

  routeTopKBackward(
    logits: Tensor,
    routing: Routing,
    dWeights: Float32Array,
    normalize: boolean,
    eps: number,
  ): Tensor {
    const [n, e] = rowsCols(logits);
    const dLogits = this.newTensor(logits.shape); // [N, E]
    if (n === 0) return dLogits;
    const k = routing.indices.length / n;
    if (!Number.isInteger(k) || dWeights.length !== n * k) {
      throw new Error(
        `routeTopKBackward: ${routing.indices.length} indices, ${dWeights.length} dWeights, ${n} rows`,
      );
    }
    this.checkRows("routeTopKBackward", routing.indices, e);
    for (const [r0, rows] of this.rowChunks(n, [e * 4, k * 4])) {
      const idxBuf = this.upload(routing.indices.subarray(r0 * k, (r0 + rows) * k));
      const dwBuf = this.upload(dWeights.subarray(r0 * k, (r0 + rows) * k));
      const inRange = this.rowRange(t(logits).buffer, r0, rows, e * 4);
      const outRange = this.rowRange(dLogits.buffer, r0, rows, e * 4, true);
      this.run({
        kernel: "moe_backward",
        entry: "route_topk_backward",
        params: [rows, e, k, normalize ? 1 : 0, { f32: eps }, inRange.skip, outRange.skip],
        bindings: [inRange, { buffer: idxBuf }, { buffer: dwBuf }, outRange],
        workgroups: ceilDiv(rows, 64),
      });
      this.release(idxBuf);
      this.release(dwBuf);
    }
    return dLogits;
  }
}
