// The matmul family, forward and backward: the ladder (naive, tiled, blocked, gemv), the
// fused SwiGLU epilogue and the grouped matmul of stacked experts (kernels/matmul*.wgsl).

import {
  checkGrouped,
  checkMatmulSwiglu,
  numelOf,
  rowsCols,
  type Tensor,
  type Weight,
  type WeightDType,
} from "../backend.ts";
import type { Binding } from "./core.ts";
import type { MatmulKernel } from "./options.ts";
import { WebGpuRowOps } from "./rows.ts";
import { ceilDiv, DTYPE_CODE, GATE_UP_BLOCK, type GpuTensor, t, w } from "./tensors.ts";

// "auto": gemv up to this many rows. Since gemv went to 8 lanes x 32 columns it takes
// 0.2-0.4x blocked's time at 8 rows on llvmpipe, 0.6-0.8x at 32 and ties near 48 (K x M
// 256 x 1024, 1024 x 1024, 2048 x 1408, f32). On a GPU gemv re-reads the weights once per
// 8 rows, but blocked's 128-row tiles leave a 32-row batch to a handful of workgroups
// (M / 128), so 32 is kept below the measured tie; a real GPU should confirm it.
export const MATMUL_AUTO_GEMV_MAX_ROWS = 32;
// "auto" above that: the register-blocked kernel, the fastest prefill kernel measured.
export const MATMUL_AUTO_PREFILL: MatmulKernel = "blocked";
// Output rows and columns per workgroup of kernels/matmul_blocked.wgsl and
// matmul_backward_blocked.wgsl (16 x TM, 16 x TN, TM = TN = 8).
export const MATMUL_BLOCKED_TILE = 128;

/**
 * TM of the register-blocked kernels for this many output rows: 4 (64-row tiles) where
 * 128-row tiles would mostly multiply zeros.
 */
export function blockedRowsPerThread(rows: number): number {
  return rows <= MATMUL_BLOCKED_TILE / 2 ? 4 : 8;
}
// Output columns and most rows of x per workgroup of kernels/matmul_gemv.wgsl (its COLS
// and MAX_ROWS).
const MATMUL_GEMV_COLS = 32;
const MATMUL_GEMV_MAX_ROWS = 8;

/** Where each group's rows start, and the total: [G + 1], as the grouped kernels read it. */
export function groupStarts(groupRows: Int32Array): Int32Array {
  const starts = new Int32Array(groupRows.length + 1);
  groupRows.forEach((n, g) => starts[g + 1] = starts[g] + n);
  return starts;
}

export class WebGpuMatmul extends WebGpuRowOps {
  matmul(x: Tensor, weight: Weight, bias?: Weight): Tensor {
    const [m, k] = weight.shape, [, xCols] = rowsCols(x);
    if (weight.shape.length !== 2 || xCols !== k) {
      throw new Error(
        `matmul: x has ${xCols} columns but weight "${weight.name}" is [${weight.shape}]`,
      );
    }
    if (bias && numelOf(bias.shape) !== m) {
      throw new Error(`matmul: bias "${bias.name}" is [${bias.shape}], want [${m}]`);
    }
    return this.matmulOn(x, weight, bias, false);
  }

  matmulSwiglu(x: Tensor, gateUp: Weight): Tensor {
    checkMatmulSwiglu(x, gateUp);
    this.checkWholeGateUpBlocks(gateUp, gateUp.shape[0]);
    return this.matmulOn(x, gateUp, undefined, true);
  }

  /**
   * The SWIGLU epilogue pairs the gate and up columns of each 8-row block in one
   * workgroup, so a gateUp weight's chunks and matrices (m rows each) hold whole blocks.
   */
  private checkWholeGateUpBlocks(gateUp: Weight, m: number) {
    const split = (row: number) => row % GATE_UP_BLOCK !== 0;
    if (split(m) || w(gateUp).chunks.some((c) => split(c.row0))) {
      throw new Error(
        `webgpu: "${gateUp.name}" [${gateUp.shape}] splits a gate/up block: the binding ` +
          `limit ${this.maxBindingBytes} holds fewer than ${GATE_UP_BLOCK} rows`,
      );
    }
  }

  /**
   * x @ weight^T (+ bias), or with swiglu over interleaved gate/up rows, silu(gate) * up
   * (half the columns; only the gemv and blocked kernels have that epilogue, so a forced
   * naive or tiled kernel gives way to blocked there).
   */
  private matmulOn(x: Tensor, weight: Weight, bias: Weight | undefined, swiglu: boolean) {
    const [n, k] = rowsCols(x);
    const [wRows] = weight.shape;
    const m = swiglu ? wRows / 2 : wRows; // output columns
    const out = this.newTensor([n, m]); // [tokens, out features]
    let kernel = this.matmulKernelFor(n);
    if (swiglu && kernel !== "gemv") kernel = "blocked";
    const constants = {
      W_DTYPE: DTYPE_CODE[weight.dtype],
      B_DTYPE: bias ? DTYPE_CODE[bias.dtype] : 0,
      HAS_BIAS: bias ? 1 : 0,
      SWIGLU: swiglu ? 1 : 0,
    };
    const biasBuffer = bias ? w(bias).chunks[0].buffer : this.emptyBuffer;
    // Each weight chunk writes its own band of output columns.
    for (const chunk of w(weight).chunks) {
      for (const [r0, rows] of this.rowChunks(n, [k * 4, m * 4])) {
        const xRange = this.rowRange(t(x).buffer, r0, rows, k * 4);
        const outRange = this.rowRange(out.buffer, r0, rows, m * 4, true);
        const params = [rows, k, chunk.rows, m, chunk.row0, xRange.skip, outRange.skip];
        const bindings: Binding[] = [
          xRange,
          { buffer: chunk.buffer },
          { buffer: biasBuffer },
          outRange,
        ];
        if (kernel === "naive") {
          this.run({
            kernel: "matmul_naive",
            entry: "main",
            constants,
            params,
            bindings,
            workgroups: [ceilDiv(chunk.rows, 64), ceilDiv(rows, 4)],
          });
        } else if (kernel === "tiled") {
          this.run({
            kernel: "matmul",
            entry: "main",
            constants,
            params,
            bindings,
            workgroups: [ceilDiv(chunk.rows, 16), ceilDiv(rows, 16)],
          });
        } else {
          const vec = this.vecViews(kernel, weight.dtype, k, xRange, chunk.buffer);
          bindings.push(
            ...vec.bindings,
            { buffer: this.emptyBuffer }, // the group starts of groupedMatmul
            { buffer: this.emptyBuffer }, // and its gathered rows
          );
          const vecConstants: Record<string, number> = { ...constants, ...vec.constants };
          // gemv: rows of x per workgroup, so that N = 1 does one row's work.
          const gemvRows = Math.min(rows, MATMUL_GEMV_MAX_ROWS);
          if (kernel === "gemv") vecConstants.ROWS = gemvRows;
          else vecConstants.TM = blockedRowsPerThread(rows);
          this.run({
            kernel: kernel === "gemv" ? "matmul_gemv" : "matmul_blocked",
            entry: "main",
            constants: vecConstants,
            params,
            bindings,
            workgroups: kernel === "gemv"
              // Flat: one workgroup per MATMUL_GEMV_COLS columns x gemvRows rows.
              ? ceilDiv(chunk.rows, MATMUL_GEMV_COLS) * ceilDiv(rows, gemvRows)
              // Output tiles of the kernel's BN x BM.
              : [ceilDiv(chunk.rows, MATMUL_BLOCKED_TILE), ceilDiv(rows, 16 * vecConstants.TM)],
          });
        }
      }
    }
    return out;
  }

  /**
   * The vec4 views (bindings 5, 6) blocked and gemv read x and w through, where K and the
   * offset allow, else placeholders; and the switches that turn them on. x rows start on
   * a vec4 when K and skip are multiples of 4 (the binding then ends on one). Elements in
   * one vec4 of w: f32 runs of 4 (both kernels), f16/bf16 runs of 8 (gemv); blocked reads
   * f16/bf16 runs of 4 as two whole words of w instead, which only needs K even.
   */
  private vecViews(
    kernel: "blocked" | "gemv",
    dtype: WeightDType,
    k: number,
    xRange: Binding & { skip: number },
    wBuffer: GPUBuffer,
  ): { bindings: Binding[]; constants: { VEC_X: number; VEC_W: number } } {
    const vecX = k % 4 === 0 && xRange.skip % 4 === 0;
    const w4Elements = dtype === "F32" ? 4 : kernel === "gemv" ? 8 : 0;
    const vecW = w4Elements > 0 ? k % w4Elements === 0 : k % 2 === 0;
    return {
      bindings: [
        vecX ? { ...xRange, write: false } : { buffer: this.emptyBuffer },
        vecW && w4Elements > 0 ? { buffer: wBuffer } : { buffer: this.emptyBuffer },
      ],
      constants: { VEC_X: vecX ? 1 : 0, VEC_W: vecW ? 1 : 0 },
    };
  }

  /** The matmul kernel for n rows of x: the configured one, or the "auto" choice. */
  matmulKernelFor(n: number): MatmulKernel {
    if (this.matmulKernel !== "auto") return this.matmulKernel;
    return n <= MATMUL_AUTO_GEMV_MAX_ROWS ? "gemv" : MATMUL_AUTO_PREFILL;
  }

  groupedMatmul(x: Tensor, stack: Weight, groupRows: Int32Array): Tensor {
    const [r, k] = rowsCols(x);
    checkGrouped(stack, k, groupRows, r);
    const startBuf = this.upload(groupStarts(groupRows));
    const out = this.groupedOn(x, stack, startBuf, Math.max(0, ...groupRows));
    this.release(startBuf);
    return out;
  }

  /**
   * groupedMatmul with the group starts [G + 1] in a device buffer, maybe written by an
   * earlier kernel (plan_experts): each workgroup finds its tile from them, the grid sized
   * for the most tiles the rows could need, so the host needs no counts. `groupRows` is
   * the rows a group holds (the largest, or an estimate): it picks gemv or the blocked
   * tile size, and any value gives the same result.
   */
  protected groupedOn(
    x: Tensor,
    stack: Weight,
    groupStart: GPUBuffer,
    groupRows: number,
    swiglu = false,
    gather?: { rows: GPUBuffer; count: number },
  ) {
    const [xRows, k] = rowsCols(x);
    // gather: the grouped rows are x's rows in the order `gather.rows` lists (GATHER), x
    // bound whole; else x's own rows, bound in row ranges as needed.
    const r = gather ? gather.count : xRows;
    const [, m] = stack.shape;
    // swiglu: a gateUp stack (ExpertStacks), silu(gate) * up written, half the columns.
    const outWidth = swiglu ? m / 2 : m;
    const out = this.newTensor([r, outWidth]); // [rows of all groups, out features]
    // Few rows per expert (decode): gemv tiles of up to 8 rows, no more than a group can
    // have (one token, one row of work); else blocked tiles of 128 rows, or of 64 where no
    // group has more (a tile holds one group's rows, so a 33-64-row group would leave half
    // of a 128-row tile idle).
    const gemv = groupRows <= MATMUL_AUTO_GEMV_MAX_ROWS;
    const tm = blockedRowsPerThread(groupRows);
    const tileRows = gemv ? Math.max(1, Math.min(groupRows, MATMUL_GEMV_MAX_ROWS)) : 16 * tm;
    if (swiglu) this.checkWholeGateUpBlocks(stack, m);
    const wholeX = { buffer: t(x).buffer, size: t(x).bytes, skip: 0 };
    const rowBytes = gather ? [outWidth * 4] : [k * 4, outWidth * 4];
    const dispatches = this.groupedDispatches(stack, r, rowBytes, tileRows);
    for (const { chunk, r0, rows, capacity, tail } of dispatches) {
      const xRange = gather ? wholeX : this.rowRange(t(x).buffer, r0, rows, k * 4);
      const outRange = this.rowRange(out.buffer, r0, rows, outWidth * 4, true);
      const vec = this.vecViews(gemv ? "gemv" : "blocked", stack.dtype, k, xRange, chunk.buffer);
      const constants: Record<string, number> = {
        W_DTYPE: DTYPE_CODE[stack.dtype],
        ...vec.constants,
        GROUPED: 1,
        SWIGLU: swiglu ? 1 : 0,
        GATHER: gather ? 1 : 0,
      };
      if (gemv) constants.ROWS = tileRows;
      else constants.TM = tm;
      // Grid columns cover the widest tile; narrower tiles' extra workgroups idle.
      const cols = Math.min(m, chunk.rows);
      this.run({
        kernel: gemv ? "matmul_gemv" : "matmul_blocked",
        entry: "main",
        constants,
        params: [rows, k, cols, outWidth, 0, xRange.skip, outRange.skip, ...tail],
        bindings: [
          xRange,
          { buffer: chunk.buffer },
          { buffer: this.emptyBuffer },
          outRange,
          ...vec.bindings,
          { buffer: groupStart },
          { buffer: gather ? gather.rows : this.emptyBuffer },
        ],
        workgroups: gemv
          ? ceilDiv(cols, MATMUL_GEMV_COLS) * capacity
          : [ceilDiv(cols, MATMUL_BLOCKED_TILE), capacity],
      });
    }
    return out;
  }

  /**
   * The dispatches of a grouped kernel: each chunk of the stack (it may hold many experts
   * or part of one) times each range of the r grouped rows bound at once. The grid covers
   * the most tiles there could be (`capacity`: each non-empty group takes at most one
   * partial tile), and each workgroup finds its own from the group starts (grouped_tile,
   * kernels/matmul_grouped.wgsl); `tail` ends its Params (first_group .. tile_rows).
   */
  private *groupedDispatches(stack: Weight, r: number, rowBytes: number[], tileRows: number) {
    const m = stack.shape[1];
    for (const chunk of w(stack).chunks) {
      const g0 = Math.floor(chunk.row0 / m), g1 = ceilDiv(chunk.row0 + chunk.rows, m);
      for (const [r0, rows] of this.rowChunks(r, rowBytes)) {
        const capacity = Math.floor(rows / tileRows) + Math.min(g1 - g0, rows);
        yield {
          chunk,
          r0,
          rows,
          capacity,
          tail: [g0, g1, m, chunk.row0, chunk.rows, r0, tileRows],
        };
      }
    }
  }

  matmulBackward(
    x: Tensor,
    weight: Weight,
    dy: Tensor,
    opts: { needInput: boolean; weightGrad?: Tensor; biasGrad?: Tensor },
  ): Tensor | null {
    const [n, k] = rowsCols(x);
    const [m, k2] = weight.shape;
    if (weight.shape.length !== 2 || k !== k2) {
      throw new Error(
        `matmulBackward: x has ${k} columns but weight "${weight.name}" is [${weight.shape}]`,
      );
    }
    if (numelOf(dy.shape) !== n * m) {
      throw new Error(`matmulBackward: dy [${dy.shape}] != [${n}, ${m}]`);
    }
    if (opts.weightGrad && numelOf(opts.weightGrad.shape) !== m * k) {
      throw new Error(`matmulBackward: weightGrad [${opts.weightGrad.shape}] != [${m}, ${k}]`);
    }
    if (opts.biasGrad && numelOf(opts.biasGrad.shape) !== m) {
      throw new Error(`matmulBackward: biasGrad [${opts.biasGrad.shape}] != [${m}]`);
    }
    const dyBuf = t(dy).buffer;
    const blocked = this.matmulBackwardKernel === "blocked";
    const kernel = blocked ? "matmul_backward_blocked" : "matmul_backward";
    const grid = (cols: number, rows: number): [number, number] =>
      blocked
        ? [ceilDiv(cols, MATMUL_BLOCKED_TILE), ceilDiv(rows, 16 * blockedRowsPerThread(rows))]
        : [ceilDiv(cols, 16), ceilDiv(rows, 16)];
    const tm = (rows: number): Record<string, number> =>
      blocked ? { TM: blockedRowsPerThread(rows) } : {};
    let dx: GpuTensor | null = null;
    if (opts.needInput) {
      // dx [N, K] = sum over weight chunks of dy[:, chunk columns] @ chunk; the first
      // chunk writes, the later ones add.
      dx = this.newTensor([n, k]);
      w(weight).chunks.forEach((chunk, ci) => {
        for (const [r0, rows] of this.rowChunks(n, [k * 4, m * 4])) {
          const dyRange = this.rowRange(dyBuf, r0, rows, m * 4);
          const dxRange = this.rowRange(dx!.buffer, r0, rows, k * 4, true);
          this.run({
            kernel,
            entry: "input_grad",
            constants: { W_DTYPE: DTYPE_CODE[weight.dtype], ...tm(rows) },
            params: [
              rows,
              k,
              chunk.rows,
              m,
              chunk.row0,
              dyRange.skip,
              0,
              dxRange.skip,
              ci > 0 ? 1 : 0,
            ],
            // blocked: the group starts of groupedMatmulBackward (none here)
            bindings: [dyRange, { buffer: chunk.buffer }, dxRange, { buffer: this.emptyBuffer }],
            workgroups: grid(k, rows),
          });
        }
      });
    }
    if (opts.weightGrad) {
      // dW [M, K] += dy^T @ x, in bands of dW rows times row ranges of dy and x.
      const dwBuf = t(opts.weightGrad).buffer;
      for (const [c0, cols] of this.rowChunks(m, [k * 4])) {
        const dwRange = this.rowRange(dwBuf, c0, cols, k * 4, true);
        for (const [r0, rows] of this.rowChunks(n, [k * 4, m * 4])) {
          const dyRange = this.rowRange(dyBuf, r0, rows, m * 4);
          const xRange = this.rowRange(t(x).buffer, r0, rows, k * 4);
          this.run({
            kernel,
            entry: "weight_grad",
            constants: tm(cols),
            params: [rows, k, cols, m, c0, dyRange.skip, xRange.skip, dwRange.skip, 1],
            bindings: [dyRange, xRange, dwRange],
            workgroups: grid(k, cols),
          });
        }
      }
    }
    if (opts.biasGrad) {
      for (const [r0, rows] of this.rowChunks(n, [m * 4])) {
        const dyRange = this.rowRange(dyBuf, r0, rows, m * 4);
        this.run({
          kernel: "matmul_backward",
          entry: "bias_grad",
          params: [rows, k, m, m, 0, dyRange.skip, 0, 0, 1],
          bindings: [dyRange, { buffer: t(opts.biasGrad).buffer, size: m * 4, write: true }],
          workgroups: ceilDiv(m, 64),
        });
      }
    }
    return dx;
  }

  groupedMatmulBackward(dy: Tensor, stack: Weight, groupRows: Int32Array): Tensor {
    const [r, m] = rowsCols(dy);
    const k = stack.shape[2];
    checkGrouped(stack, m, groupRows, r, "groupedMatmulBackward", 1);
    const startBuf = this.upload(groupStarts(groupRows));
    const dx = this.newTensor([r, k]);
    // Tiles of up to 128 rows (64 where no group has more than 64), one group's rows each.
    const tm = blockedRowsPerThread(Math.max(0, ...groupRows)), tileRows = 16 * tm;
    const dispatches = this.groupedDispatches(stack, r, [k * 4, m * 4], tileRows);
    for (const { chunk, r0, rows, capacity, tail } of dispatches) {
      const dyRange = this.rowRange(t(dy).buffer, r0, rows, m * 4);
      const dxRange = this.rowRange(dx.buffer, r0, rows, k * 4, true);
      this.run({
        kernel: "matmul_backward_blocked",
        entry: "input_grad",
        constants: { W_DTYPE: DTYPE_CODE[stack.dtype], TM: tm, GROUPED: 1 },
        params: [rows, k, 0, m, 0, dyRange.skip, 0, dxRange.skip, 0, ...tail],
        bindings: [dyRange, { buffer: chunk.buffer }, dxRange, { buffer: startBuf }],
        workgroups: [ceilDiv(k, MATMUL_BLOCKED_TILE), capacity],
      });
    }
    this.release(startBuf);
    return dx;
  }
}
