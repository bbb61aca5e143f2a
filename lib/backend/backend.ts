// The op interface every backend implements: the CPU reference (cpu.ts) and WebGPU
// (webgpu.ts). Activations are f32; weights keep their checkpoint dtype on the device.
// Ops return new tensors (except scatterAddRows) and the caller frees what it no longer
// needs, as in llm.c: memory is explicit, nothing is garbage-collected on the GPU.

import type { RawTensor } from "../io/safetensors.ts";

export type WeightDType = "F32" | "F16" | "BF16";

/** An f32 activation tensor owned by a backend. */
export interface Tensor {
  readonly shape: readonly number[];
}

/** A weight uploaded in its checkpoint dtype. */
export interface Weight {
  readonly name: string;
  readonly shape: readonly number[];
  readonly dtype: WeightDType;
}

export interface Routing {
  /** [tokens, k] expert ids, in descending probability order. */
  indices: Int32Array;
  /** [tokens, k] routing weights (probabilities, renormalised if the config says so). */
  weights: Float32Array;
}

export interface AttentionShape {
  batch: number;
  /** Query rows per sequence; the queries are the last qLen of kvLen positions. */
  qLen: number;
  kvLen: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  /** Sliding window (keys with i - j >= window are masked), or null. */
  window: number | null;
}

export interface Backend {
  readonly name: "cpu" | "webgpu";
  /** Human-readable device description (adapter name for WebGPU). */
  readonly description: string;

  uploadWeight(raw: RawTensor): Weight;
  freeWeight(w: Weight): void;
  tensor(data: Float32Array, shape: readonly number[]): Tensor;
  read(t: Tensor): Promise<Float32Array>;
  free(t: Tensor): void;

  /** [ids.length, H] rows of `table` [V, H]. */
  embedding(table: Weight, ids: Int32Array): Tensor;
  /** Row-wise w * x / sqrt(mean(x^2) + eps), x [N, D], w [D]. */
  rmsNorm(x: Tensor, w: Weight, eps: number): Tensor;
  /** x [N, K] @ w[M, K]^T (+ bias [M]) -> [N, M], f32 accumulation. */
  matmul(x: Tensor, w: Weight, bias?: Weight): Tensor;
  add(a: Tensor, b: Tensor): Tensor;
  /** silu(gate) * up, elementwise. */
  swiglu(gate: Tensor, up: Tensor): Tensor;
  /** Clamp every entry to [-limit, limit] (OLMoE clip_qkv). */
  clamp(x: Tensor, limit: number): Tensor;
  /** HF rotate_half RoPE on x [N, heads*headDim]; row r has position positions[r] / linearFactor. */
  rope(
    x: Tensor,
    positions: Int32Array,
    heads: number,
    headDim: number,
    theta: number,
    linearFactor: number,
  ): Tensor;
  /** Causal (optionally windowed) GQA attention: q [B*qLen, heads*hd], k/v [B*kvLen, kvHeads*hd]. */
  attention(q: Tensor, k: Tensor, v: Tensor, shape: AttentionShape): Tensor;
  /** softmax over all experts, top-k, optional renormalisation; small result read to host. */
  routeTopK(logits: Tensor, k: number, normalize: boolean, eps: number): Promise<Routing>;
  /** Rows `rows` of x -> [rows.length, H]. */
  gatherRows(x: Tensor, rows: Int32Array): Tensor;
  /** out[rows[i]] += scales[i] * y[i], in place. Rows in one call are distinct. */
  scatterAddRows(out: Tensor, y: Tensor, rows: Int32Array, scales: Float32Array): void;
  /** y [N, D] * sigmoid(g [N, 1]) row-wise (Qwen2-MoE shared-expert gate). */
  sigmoidScaleRows(y: Tensor, g: Tensor): Tensor;
  /** y [N, D] * s, elementwise by a scalar. */
  scale(y: Tensor, s: number): Tensor;
}

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function rowsCols(t: { shape: readonly number[] }): [number, number] {
  const cols = t.shape[t.shape.length - 1];
  return [numelOf(t.shape) / cols, cols];
}
