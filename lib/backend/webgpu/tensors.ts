// Tensors and weights on the device, and the small helpers every op file uses.

import { GATE_UP_RUN, numelOf, type Tensor, type Weight, type WeightDType } from "../backend.ts";

export class GpuTensor implements Tensor {
  constructor(readonly buffer: GPUBuffer, readonly shape: readonly number[]) {}
  get bytes(): number {
    return numelOf(this.shape) * 4;
  }
}

export interface WeightChunk {
  buffer: GPUBuffer;
  /** First row of the weight held by this chunk, and how many rows. */
  row0: number;
  rows: number;
}

export class GpuWeight implements Weight {
  constructor(
    readonly name: string,
    readonly shape: readonly number[],
    readonly dtype: WeightDType,
    readonly chunks: WeightChunk[],
  ) {}
}

export const DTYPE_CODE: Record<WeightDType, number> = { F32: 0, F16: 1, BF16: 2 };
export const DTYPE_BYTES: Record<WeightDType, number> = { F32: 4, F16: 2, BF16: 2 };

// Rows of a gateUp stack's gate run and matching up run (ExpertStacks).
export const GATE_UP_BLOCK = 2 * GATE_UP_RUN;

export const t = (x: Tensor) => x as GpuTensor;
export const w = (x: Weight) => x as GpuWeight;
export const ceilDiv = (a: number, b: number) => Math.ceil(a / b);

/**
 * Weights split into chunks of whole rows, a row being the last dimension (a 1-D weight
 * is one row): a stack of experts [G, M, K] splits like [G * M, K], so one expert larger
 * than a binding spreads over chunks.
 */
export const weightRows = (shape: readonly number[]) =>
  shape.length >= 2 ? numelOf(shape) / shape[shape.length - 1] : 1;
