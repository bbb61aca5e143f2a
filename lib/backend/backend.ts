// The op interface every backend implements: the CPU reference (cpu.ts) and WebGPU
// (webgpu/). Activations are f32; weights keep their checkpoint dtype on the device.
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

/** routeTopK's settings. */
export interface RouteSpec {
  k: number;
  normalize: boolean;
  eps: number;
}

/**
 * A layer's expert matrices stacked for routedExperts: gateUp [E, 2W, H] holds each
 * expert's gate and up rows interleaved in runs of GATE_UP_RUN (gate rows 0-3, up rows
 * 0-3, gate rows 4-7, ...), so one matmul tile computes matching gate and up columns and
 * SwiGLU fuses into it; down [E, H, W]. W is a multiple of GATE_UP_RUN (Model pads with
 * zeros).
 */
export interface ExpertStacks {
  gateUp: Weight;
  down: Weight;
}

export const GATE_UP_RUN = 4;

/** RoPE of splitQkv: row r at position positions[r] / linearFactor, base theta. */
export interface RopeSpec {
  positions: Int32Array;
  theta: number;
  linearFactor: number;
}

/** splitQkv's contract: rows of (heads + 2 kvHeads) heads of an even headDim. */
export function checkSplitQkv(
  qkv: Tensor,
  heads: number,
  kvHeads: number,
  headDim: number,
  rope: RopeSpec | null,
) {
  const [n, d] = rowsCols(qkv);
  if (d !== (heads + 2 * kvHeads) * headDim || headDim % 2 !== 0) {
    throw new Error(
      `splitQkv: row width ${d} is not (${heads} + 2 x ${kvHeads}) heads of an even ${headDim}`,
    );
  }
  if (rope && rope.positions.length !== n) {
    throw new Error(`splitQkv: ${rope.positions.length} positions, ${n} rows`);
  }
}

/**
 * Rows of a KV cache k and v [rows, kvHeads * headDim] that splitQkvIntoCache fills: input
 * row r (sequence b = floor(r / seqLen), position t = r % seqLen) goes to row
 * b * capacity + past + t.
 */
export interface KvRows {
  k: Tensor;
  v: Tensor;
  seqLen: number;
  capacity: number;
  past: number;
}

/** The cache row of each of n input rows (KvRows), after checking that they fit. */
export function kvCacheRows(cache: KvRows, n: number, kvWidth: number): Int32Array {
  const { seqLen, capacity, past } = cache;
  const [rows, width] = rowsCols(cache.k);
  const sequences = n / seqLen;
  if (
    !Number.isInteger(sequences) || past + seqLen > capacity || sequences * capacity > rows ||
    width !== kvWidth || cache.v.shape.join() !== cache.k.shape.join()
  ) {
    throw new Error(
      `splitQkvIntoCache: ${n} rows of ${seqLen} per sequence at position ${past} do not fit ` +
        `caches k [${cache.k.shape}], v [${cache.v.shape}] of capacity ${capacity} and width ` +
        kvWidth,
    );
  }
  return Int32Array.from(
    { length: n },
    (_, r) => Math.floor(r / seqLen) * capacity + past + r % seqLen,
  );
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
  /**
   * Rows each sequence has in k and v (default kvLen): a KV cache of capacity rows per
   * sequence is attended in place, its first kvLen rows, without copying them out.
   * The forward only; the backward takes kvLen rows.
   */
  kvStride?: number;
}

/** AdamW hyper-parameters for one optimizer step (decoupled weight decay, as torch.optim.AdamW). */
export interface AdamWHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** 1-based step number, for the bias corrections 1 - beta^step. */
  step: number;
  /** The gradient is used as gradScale * grad (1 / accumulation steps times the clip factor). */
  gradScale: number;
}

/**
 * Backward ops for training, op-level as in llm.c: one backward per forward op, the
 * model-level backward (lib/train/) chains them by hand. Conventions:
 * - Gradients are f32 Tensors with the shape of what they are the gradient of.
 * - Outputs named `...Grad` passed in by the caller (weight, bias, table gradients) are
 *   ACCUMULATED (+=) so gradient accumulation over micro-batches and weights used twice
 *   (tied embeddings) need no extra adds; the caller zeroes them with `zero`.
 * - Every other output is a NEW tensor the caller frees.
 * - Inputs are the same tensors (same values) the forward op received; ops that need the
 *   forward output recompute it (cheap) unless it is passed explicitly.
 * - Small per-token routing quantities (routing weights and their gradients) live on the
 *   host, like the forward `routeTopK` result.
 */
export interface BackwardOps {
  // (Kept apart from Backend so a backend without them still type-checks; training code
  // asks for TrainingBackend.)
  /**
   * A weight the optimizer trains: its values are kept as an f32 master copy on the device
   * (whatever raw.dtype is; the returned Weight reports dtype "F32") and used by every
   * forward/backward op like any weight. `adamwStep` updates it in place. Frozen weights
   * keep using uploadWeight (checkpoint dtype).
   */
  uploadTrainableWeight(raw: RawTensor): Weight;
  /** The current f32 values of a weight (the master copy for a trainable one), [numel]. */
  readWeight(w: Weight): Promise<Float32Array>;
  /** Set every entry of t to 0, in place. */
  zero(t: Tensor): void;
  /** dst += src, elementwise, in place (same numel). */
  addInPlace(dst: Tensor, src: Tensor): void;
  /**
   * Sum of squares of all entries of all the tensors (the global gradient norm), read to
   * the host at once: one round trip for every gradient of a model.
   */
  sumSquares(tensors: readonly Tensor[]): Promise<number>;

  /**
   * Backward of y = x @ w^T (+ bias): x [N, K], w [M, K] (any dtype, trainable or not),
   * dy [N, M].
   * - returns dx = dy @ w, [N, K], when opts.needInput, else null;
   * - opts.weightGrad [M, K] f32: += dy^T @ x;
   * - opts.biasGrad [M]: += column sums of dy.
   */
  matmulBackward(
    x: Tensor,
    w: Weight,
    dy: Tensor,
    opts: { needInput: boolean; weightGrad?: Tensor; biasGrad?: Tensor },
  ): Tensor | null;
  /**
   * Backward of y = w * x / rms(x) (row-wise, x [N, D], w [D]): returns dx [N, D];
   * weightGrad [D] (optional) += sum over rows of dy * x / rms(x).
   */
  rmsNormBackward(x: Tensor, w: Weight, dy: Tensor, eps: number, weightGrad?: Tensor): Tensor;
  /** Backward of silu(gate) * up: returns dGate, dUp with the shape of gate. */
  swigluBackward(gate: Tensor, up: Tensor, dy: Tensor): { dGate: Tensor; dUp: Tensor };
  /**
   * silu(gate) * up of a gateUp product [R, 2W] (gate and up columns interleaved in runs of
   * GATE_UP_RUN, a groupedMatmul over ExpertStacks.gateUp) -> [R, W]: the training forward
   * of the grouped experts, which keeps the product for the backward.
   */
  swigluGateUp(gateUp: Tensor): Tensor;
  /** Backward of swigluGateUp: dy [R, W] -> dGateUp [R, 2W], interleaved like gateUp. */
  swigluGateUpBackward(gateUp: Tensor, dy: Tensor): Tensor;
  /**
   * Input gradient of groupedMatmul(x, stack, groupRows) for a frozen stack [G, M, K]:
   * dy [R, M] -> dx [R, K], each group's rows times its matrix (dy_g @ stack[g]).
   */
  groupedMatmulBackward(dy: Tensor, stack: Weight, groupRows: Int32Array): Tensor;
  /** Backward of clamp(x, limit): dx = dy where -limit <= x <= limit, else 0. */
  clampBackward(x: Tensor, dy: Tensor, limit: number): Tensor;
  /** Backward of rope (same arguments as rope): the inverse rotation of dy, [N, heads*headDim]. */
  ropeBackward(
    dy: Tensor,
    positions: Int32Array,
    heads: number,
    headDim: number,
    theta: number,
    linearFactor: number,
  ): Tensor;
  /**
   * attention for training: also returns what attentionBackward can reuse, each (query,
   * head) row's logsumexp [B*qLen*heads, 2] (WebGPU's tiled kernel), or null where the
   * backward recomputes it (the CPU, whose BLAS backward rebuilds P from q k^T anyway).
   */
  attentionSaving(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    shape: AttentionShape,
  ): { out: Tensor; stats: Tensor | null };
  /**
   * Backward of attention (q, k, v after RoPE, same shape arguments as the forward): the
   * probabilities are recomputed from q and k, with the forward's logsumexp where
   * `saved` has it (attentionSaving; then the backward writes into `saved.stats`).
   * Returns dq [B*qLen, heads*hd] and dk, dv [B*kvLen, kvHeads*hd] (summed over the query
   * heads of each GQA group).
   */
  attentionBackward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dOut: Tensor,
    shape: AttentionShape,
    saved?: { out: Tensor; stats: Tensor | null },
  ): { dq: Tensor; dk: Tensor; dv: Tensor };
  /** Backward of embedding: tableGrad [V, H] row ids[i] += dy[i] (dy [ids.length, H]). */
  embeddingBackward(ids: Int32Array, dy: Tensor, tableGrad: Tensor): void;
  /**
   * Backward of scatterAddRows(out, y, rows, scales) with respect to y and the scales
   * (the gradient to `out` passes through unchanged): dOut [N, H], y [rows.length, H].
   * dy[i] = scales[i] * dOut[rows[i]]; dScales[i] = dot(dOut[rows[i]], y[i]) ([rows]: a
   * layer's experts read theirs together, readAll). (gatherRows' backward is
   * scatterAddRows(dx, dxe, rows, ones).)
   */
  scatterAddRowsBackward(
    dOut: Tensor,
    y: Tensor,
    rows: Int32Array,
    scales: Float32Array,
  ): { dy: Tensor; dScales: Tensor };
  /**
   * Backward of routeTopK for a fixed selection (the top-k choice is piecewise constant):
   * logits [N, E], routing from the forward, dWeights [N, k] (host). The gradient flows
   * through the softmax over all E experts into the selected weights only (renormalised
   * by (sum of selected + eps) when normalize). Returns dLogits [N, E].
   */
  routeTopKBackward(
    logits: Tensor,
    routing: Routing,
    dWeights: Float32Array,
    normalize: boolean,
    eps: number,
  ): Tensor;
  /** Backward of y * sigmoid(g): y [N, D], g [N, 1]; returns dy [N, D], dg [N, 1]. */
  sigmoidScaleRowsBackward(y: Tensor, g: Tensor, dOut: Tensor): { dy: Tensor; dg: Tensor };
  /**
   * Softmax cross-entropy of logits [N, V] against targets [N]; rows whose target is
   * ignoreIndex count neither in the loss nor the gradient. loss = mean over the `count`
   * counted rows (0 when none); dLogits [N, V] = gradScale * (softmax - onehot) on counted
   * rows, 0 elsewhere, with gradScale defaulting to 1 / count (pass 1 / total counted
   * tokens of the whole accumulated batch to get its mean).
   */
  crossEntropy(
    logits: Tensor,
    targets: Int32Array,
    ignoreIndex: number,
    gradScale?: number,
  ): Promise<{ loss: number; count: number; dLogits: Tensor }>;
  /**
   * One AdamW step in place on a trainable weight (from uploadTrainableWeight) with
   * grad, m, v f32 tensors of its shape (m, v start at 0 and are updated in place):
   * g = gradScale * grad; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
   * p -= lr * (wd * p + (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps)).
   */
  adamwStep(param: Weight, grad: Tensor, m: Tensor, v: Tensor, hyper: AdamWHyper): void;
}

export interface Backend {
  readonly name: "cpu" | "webgpu";
  /** Human-readable device description (adapter name for WebGPU). */
  readonly description: string;
  /**
   * Whether weights are held as f32 whatever their checkpoint dtype (the CPU). Model then
   * builds its stacks in f32, so the host never holds a 16-bit stack beside its f32 copy.
   */
  readonly f32Weights: boolean;

  /**
   * A weight from raw values. The backend may keep raw.bytes (the CPU keeps aligned F32
   * bytes instead of copying them), so the caller must not change them afterwards.
   */
  uploadWeight(raw: RawTensor): Weight;
  freeWeight(w: Weight): void;
  tensor(data: Float32Array, shape: readonly number[]): Tensor;
  read(t: Tensor): Promise<Float32Array>;
  /** Several tensors in one round trip (read's results, in order). */
  readAll(ts: readonly Tensor[]): Promise<Float32Array[]>;
  free(t: Tensor): void;
  /**
   * t's entries under another shape of as many entries, without a copy (Qwen3's per-head
   * q/k norms see [N, heads * headDim] as [N * heads, headDim]). The two share storage:
   * free one of them, once.
   */
  reshape(t: Tensor, shape: readonly number[]): Tensor;

  /**
   * [N, H] rows of `table` [V, H] for N token ids: from the host (checked against V), or an
   * id tensor of argmaxRows (kept where it was made; the caller keeps its ids below V).
   */
  embedding(table: Weight, ids: Int32Array | Tensor): Tensor;
  /**
   * [N] ids of x [N, C]: each row's first maximum (argmaxRow), as i32 bit patterns (idsOf
   * what `read` gives). Greedy decoding feeds them to the next step's embedding, so no
   * token goes through the host between steps.
   */
  argmaxRows(x: Tensor): Tensor;
  /** Row-wise w * x / sqrt(mean(x^2) + eps), x [N, D], w [D]. */
  rmsNorm(x: Tensor, w: Weight, eps: number): Tensor;
  /**
   * A residual add and the norm after it in one pass over the rows: sum = a + b and
   * normed = rmsNorm(sum, w, eps), a and b [N, D] of one shape, w [D]. Both outputs are
   * new tensors with exactly the values of add then rmsNorm on the same backend.
   */
  addRmsNorm(a: Tensor, b: Tensor, w: Weight, eps: number): { sum: Tensor; normed: Tensor };
  /** x [N, K] @ w[M, K]^T (+ bias [M]) -> [N, M], f32 accumulation. */
  matmul(x: Tensor, w: Weight, bias?: Weight): Tensor;
  add(a: Tensor, b: Tensor): Tensor;
  /**
   * A SwiGLU MLP's first half in one pass: x [N, K] @ gateUp [2W, K]^T, whose rows are the
   * gate and up rows interleaved in runs of GATE_UP_RUN (Model.mlpStack), gives
   * silu(gate) * up [N, W] without the two [N, W] products.
   */
  matmulSwiglu(x: Tensor, gateUp: Weight): Tensor;
  /**
   * All experts of a layer in one call: x [R, K] holds groupRows[g] consecutive rows for
   * each group g in turn, and each row is multiplied by its group's matrix of `stack`
   * [G, M, K] (a weight uploaded with the experts stacked): out [R, M].
   */
  groupedMatmul(x: Tensor, stack: Weight, groupRows: Int32Array): Tensor;
  /**
   * out[t] += sum over j < k, in order, of scales[t k + j] * y[sources[t k + j]]:
   * each token gathers its k expert outputs (no two threads write one row).
   */
  combineRows(out: Tensor, y: Tensor, sources: Int32Array, scales: Float32Array, k: number): void;
  /**
   * The routed experts of one MoE layer, start to end on the backend: route `logits`
   * [N, E] as routeTopK does, run each expert's SwiGLU MLP down(silu(gate x) * up x) on
   * its tokens (the grouped path: gatherRows, groupedMatmul, combineRows) and add each
   * token's routing-weighted outputs into out [N, H] in expert order. Nothing is read
   * back to the host, so a decode step never waits on the routing.
   */
  routedExperts(
    xn: Tensor,
    logits: Tensor,
    stacks: ExpertStacks,
    route: RouteSpec,
    out: Tensor,
  ): Promise<void>;
  /** a * b, elementwise (same numel; compressed experts' scaling vectors). */
  mul(a: Tensor, b: Tensor): Tensor;
  /** silu(gate) * up, elementwise. */
  swiglu(gate: Tensor, up: Tensor): Tensor;
  /** Clamp every entry to [-limit, limit] (OLMoE clip_qkv). */
  clamp(x: Tensor, limit: number): Tensor;
  /**
   * q [N, heads * headDim], k and v [N, kvHeads * headDim] from one fused projection qkv
   * [N, (heads + 2 kvHeads) * headDim] (a matmul over Model.rowStack of the three
   * weights), q and k rotated as rope() does when `rope` is given: one pass for what was
   * three matmul outputs and two rope passes.
   */
  splitQkv(
    qkv: Tensor,
    heads: number,
    kvHeads: number,
    headDim: number,
    rope: RopeSpec | null,
  ): { q: Tensor; k: Tensor; v: Tensor };
  /**
   * splitQkv writing k and v straight into rows of a KV cache (KvRows) instead of new
   * tensors, the decode step's cache append without two more passes; returns q.
   */
  splitQkvIntoCache(
    qkv: Tensor,
    heads: number,
    kvHeads: number,
    headDim: number,
    rope: RopeSpec | null,
    cache: KvRows,
  ): Tensor;
  /** HF rotate_half RoPE on x [N, heads*headDim]; row r has position positions[r] / linearFactor. */
  rope(
    x: Tensor,
    positions: Int32Array,
    heads: number,
    headDim: number,
    theta: number,
    linearFactor: number,
  ): Tensor;
  /** Causal (optionally windowed) GQA attention: q [B*qLen, heads*hd], k/v [B*kvStride, kvHeads*hd]. */
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

/**
 * The searches' divergence kept on the device, where a backend has it (WebGPU): the expert
 * search's candidates then never come back to the host. The CPU scores host rows in f64
 * (lib/methods/divergence.ts Reference).
 */
export interface DeviceDivergence {
  /**
   * JS(P||Q) of each row: p [N, D] the original model's softmax + eps, Q = softmax of the
   * row of cond [N, D] + eps; returns [N] (f32, summed without the host form's
   * cancellation: kernels/divergence.wgsl).
   */
  jsDivergenceRows(p: Tensor, cond: Tensor, eps: number): Tensor;
}

export function hasDeviceDivergence(be: Backend): be is Backend & DeviceDivergence {
  return typeof (be as Partial<DeviceDivergence>).jsDivergenceRows === "function";
}

/** A layer's expert matrices for compressedExperts: gate and up [E, W, H], down [E, H, W]. */
export interface SeparateExpertStacks {
  gate: Weight;
  up: Weight;
  down: Weight;
}

/**
 * compressedExperts' routing: sorted top-k, of which the first `mainExperts` run, their
 * weights renormalised (where `normalize`) over all top-k or the main experts.
 */
export interface CompressedRouteSpec extends RouteSpec {
  mainExperts: number;
  renormOver: "top_k" | "main";
}

/**
 * Compressed experts with the routing kept on the device, where a backend has it (WebGPU):
 * the split into main and aux experts, the aux alphas and the main experts' plan are
 * kernels, so a decoded token waits on nothing. The CPU, whose routing is on the host
 * anyway, runs the decoder's composition of ops (dispatchCompressedExperts).
 */
export interface DeviceCompressedExperts {
  /**
   * out [N, H] += each token's main experts (stacks, frozen) on xn [N, H] scaled by theta,
   * weighted as lib/model/compressed_experts.ts says: theta_v = alpha @ slots[v]^T, slots
   * [cols, E] ces slot v transposed, asked for only once the batch is known to fit. Returns
   * false, having recorded nothing, where the device plan does not fit (routing over one
   * binding, over 1,024 experts): the caller then plans on the host.
   */
  compressedExperts(
    xn: Tensor,
    logits: Tensor,
    stacks: SeparateExpertStacks,
    slots: () => Promise<readonly Weight[]>,
    route: CompressedRouteSpec,
    out: Tensor,
  ): Promise<boolean>;
}

export function hasDeviceCompressedExperts(be: Backend): be is Backend & DeviceCompressedExperts {
  return typeof (be as Partial<DeviceCompressedExperts>).compressedExperts === "function";
}

/** A backend that can train: the forward ops plus the backward ops (CPU; WebGPU when it has them). */
export interface TrainingBackend extends Backend, BackwardOps {}

export function supportsTraining(be: Backend): be is TrainingBackend {
  return typeof (be as Partial<BackwardOps>).matmulBackward === "function";
}

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/**
 * The index of the first maximum of row `row` of x [rows, cols], as torch.argmax: NaN never
 * wins, and a row with nothing above -Infinity gives 0.
 */
export function argmaxRow(x: Float32Array, row: number, cols: number): number {
  let best = 0, bestValue = -Infinity;
  for (let j = 0; j < cols; j++) {
    const v = x[row * cols + j];
    if (v > bestValue) (bestValue = v), (best = j);
  }
  return best;
}

/** An id tensor's values (argmaxRows) as read back: the ids. */
export function idsOf(bits: Float32Array): Int32Array {
  return new Int32Array(bits.buffer, bits.byteOffset, bits.length);
}

/** reshape's contract: as many entries. */
export function checkReshape(t: Tensor, shape: readonly number[]): void {
  if (numelOf(shape) !== numelOf(t.shape) || shape.some((d) => !Number.isSafeInteger(d) || d < 0)) {
    throw new Error(`reshape: [${t.shape}] has ${numelOf(t.shape)} entries, not [${shape}]`);
  }
}

export function rowsCols(t: { shape: readonly number[] }): [number, number] {
  const cols = t.shape[t.shape.length - 1];
  return [numelOf(t.shape) / cols, cols];
}

/**
 * groupedMatmul's contract: stack [G, M, K] matches x's K (`along` 2; its backward's dy
 * matches M, `along` 1), and groupRows sums to x's rows.
 */
export function checkGrouped(
  stack: Weight,
  cols: number,
  groupRows: Int32Array,
  rows: number,
  op = "groupedMatmul",
  along: 1 | 2 = 2,
) {
  const g = stack.shape[0];
  if (stack.shape.length !== 3 || stack.shape[along] !== cols) {
    throw new Error(
      `${op}: ${
        along === 2 ? "x" : "dy"
      } has ${cols} columns but "${stack.name}" is [${stack.shape}]`,
    );
  }
  let sum = 0;
  for (const r of groupRows) {
    if (r < 0) throw new Error(`${op}: negative row count ${r}`);
    sum += r;
  }
  if (groupRows.length !== g || sum !== rows) {
    throw new Error(
      `${op}: ${groupRows.length} groups of ${sum} rows for ${g} matrices and ${rows} rows`,
    );
  }
}

/** attentionBackward's contract: the forward's, k and v of kvLen rows a sequence, dOut like q. */
export function checkAttentionBackward(
  q: Tensor,
  k: Tensor,
  v: Tensor,
  dOut: Tensor,
  s: AttentionShape,
) {
  if (checkAttentionShape("attentionBackward", q, k, v, s) !== s.kvLen) {
    throw new Error(`attentionBackward: k and v must have kvLen rows a sequence, not a cache`);
  }
  if (numelOf(dOut.shape) !== numelOf(q.shape)) {
    throw new Error(`attentionBackward: dOut [${dOut.shape}] unlike q [${q.shape}]`);
  }
}

/** swigluGateUp's (and its backward's) contract: rows of whole gate/up blocks. */
export function checkGateUp(op: string, gateUp: Tensor): [number, number] {
  const [rows, cols] = rowsCols(gateUp);
  if (cols % (2 * GATE_UP_RUN) !== 0) {
    throw new Error(`${op}: [${gateUp.shape}] is not rows of whole gate/up runs of ${GATE_UP_RUN}`);
  }
  return [rows, cols / 2];
}

/** matmulSwiglu's contract: a 2-D stack of whole gate/up blocks as wide as x's rows. */
export function checkMatmulSwiglu(x: Tensor, gateUp: Weight) {
  const [rows, k] = gateUp.shape;
  if (gateUp.shape.length !== 2 || rows % (2 * GATE_UP_RUN) !== 0 || rowsCols(x)[1] !== k) {
    throw new Error(
      `matmulSwiglu: x has ${rowsCols(x)[1]} columns; weight "${gateUp.name}" [${gateUp.shape}] ` +
        `is not [2W, ${rowsCols(x)[1]}] of whole gate/up runs of ${GATE_UP_RUN}`,
    );
  }
}

/** attention's contract (q, k, v against the shape); returns the rows per sequence of k and v. */
export function checkAttentionShape(
  op: string,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  s: AttentionShape,
): number {
  const { batch, qLen, kvLen, heads, kvHeads, headDim } = s;
  const stride = s.kvStride ?? kvLen;
  if (heads % kvHeads !== 0) throw new Error(`${op}: ${heads} heads, ${kvHeads} kv heads`);
  if (qLen > kvLen) throw new Error(`${op}: qLen ${qLen} > kvLen ${kvLen}`);
  if (kvLen > stride) throw new Error(`${op}: kvLen ${kvLen} > kvStride ${stride}`);
  const kvNumel = batch * stride * kvHeads * headDim;
  if (
    numelOf(q.shape) !== batch * qLen * heads * headDim || numelOf(k.shape) !== kvNumel ||
    numelOf(v.shape) !== kvNumel
  ) {
    throw new Error(
      `${op}: q [${q.shape}] / k [${k.shape}] / v [${v.shape}] do not match ${batch} sequences ` +
        `of ${qLen} queries over ${stride} key rows, ${heads}/${kvHeads} heads of ${headDim}`,
    );
  }
  return stride;
}

/** addRmsNorm's contract: a and b of one shape, w as wide as their rows. */
export function checkAddRmsNorm(a: Tensor, b: Tensor, w: Weight) {
  if (a.shape.length !== b.shape.length || a.shape.some((d, i) => d !== b.shape[i])) {
    throw new Error(`addRmsNorm: shapes [${a.shape}] and [${b.shape}] differ`);
  }
  const [, d] = rowsCols(a);
  if (numelOf(w.shape) !== d) {
    throw new Error(`addRmsNorm: rows of ${d} but weight "${w.name}" is [${w.shape}]`);
  }
}

/** combineRows' contract: k sources and scales per output row, each a row of y. */
export function checkCombine(
  rows: number,
  yRows: number,
  sources: Int32Array,
  scales: Float32Array,
  k: number,
) {
  if (sources.length !== rows * k || scales.length !== rows * k) {
    throw new Error(
      `combineRows: ${sources.length} sources, ${scales.length} scales for ${rows} rows x ${k}`,
    );
  }
  // Indexed loops here and below: for-of over a typed array ran 20x slower in V8.
  for (let i = 0; i < sources.length; i++) {
    const s = sources[i];
    if (s < 0 || s >= yRows) throw new Error(`combineRows: source row ${s} out of [0, ${yRows})`);
  }
}

/**
 * Where the grouped expert path puts each routed token (the host twin of the WebGPU
 * plan_experts kernel): `order` lists the token of each grouped row, experts in turn and
 * tokens ascending within one; for token t, sources[t k + j] is the grouped row of its
 * j-th expert counted in ascending expert id (the order the outputs are added in) and
 * scales[t k + j] that expert's routing weight; slots[row] is the index into
 * routing.indices that a grouped row comes from, and rowScales[row] its routing weight
 * (what the combine's backward scales each row's gradient by).
 */
export function expertPlan(routing: Routing, k: number, experts: number) {
  const groupRows = new Int32Array(experts);
  for (let i = 0; i < routing.indices.length; i++) {
    const e = routing.indices[i];
    if (e < 0 || e >= experts) throw new Error(`expertPlan: expert ${e} out of [0, ${experts})`);
    groupRows[e]++;
  }
  const next = new Int32Array(experts); // the next grouped row of each expert
  for (let e = 1; e < experts; e++) next[e] = next[e - 1] + groupRows[e - 1];
  const tokens = routing.indices.length / k;
  const order = new Int32Array(tokens * k), slots = new Int32Array(tokens * k);
  const sources = new Int32Array(tokens * k), scales = new Float32Array(tokens * k);
  const rowScales = new Float32Array(tokens * k);
  for (let t = 0; t < tokens; t++) {
    const picks = routing.indices.subarray(t * k, t * k + k);
    for (let j = 0; j < k; j++) {
      const e = picks[j], at = next[e]++;
      let rank = 0; // experts of this token with a smaller id come first
      for (let o = 0; o < k; o++) if (picks[o] < e) rank++;
      order[at] = t;
      slots[at] = t * k + j;
      sources[t * k + rank] = at;
      scales[t * k + rank] = rowScales[at] = routing.weights[t * k + j];
    }
  }
  return { order, slots, groupRows, sources, scales, rowScales };
}

/** routedExperts' contract: logits [N, E], out [N, H], stacks of E experts over H. */
export function checkRoutedExperts(
  xn: Tensor,
  logits: Tensor,
  stacks: ExpertStacks,
  route: RouteSpec,
  out: Tensor,
) {
  const [n, h] = rowsCols(xn), [logitRows, e] = rowsCols(logits), width = stacks.down.shape[2];
  if (logitRows !== n || numelOf(out.shape) !== n * h) {
    throw new Error(
      `routedExperts: x [${xn.shape}], logits [${logits.shape}] and out [${out.shape}] disagree`,
    );
  }
  if (route.k < 1 || route.k > e) {
    throw new Error(`routedExperts: k = ${route.k} with ${e} experts`);
  }
  if (width % GATE_UP_RUN !== 0) {
    throw new Error(`routedExperts: expert width ${width} is not a multiple of ${GATE_UP_RUN}`);
  }
  const want: [Weight, number[]][] = [[stacks.gateUp, [e, 2 * width, h]], [stacks.down, [
    e,
    h,
    width,
  ]]];
  for (const [stack, shape] of want) {
    if (stack.shape.join() !== shape.join()) {
      throw new Error(`routedExperts: "${stack.name}" is [${stack.shape}], want [${shape}]`);
    }
  }
}
