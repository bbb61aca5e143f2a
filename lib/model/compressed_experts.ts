// Compressed Experts (He et al. 2025, arXiv 2503.00634): of each token's sorted top-k
// experts, the first k_m ("main") run in full; the other k_a = k - k_m ("auxiliary") are
// replaced by learned scaling vectors that modulate the main experts.
//
// Per MoE layer one tensor `ces` [E, 3, d] (release layout, d = max(hidden, expert
// width) so that expert width > hidden also fits): slot 0 scales the gate_proj input
// (first `hidden` entries used), slot 1 the intermediate activation (first `expertWidth`
// entries), slot 2 the up_proj input (first `hidden` entries). Ones = plain top-k_m.
//
// Per token, with p the softmax probabilities of the sorted top-k:
//   alpha'_i = p_i / sum_{j in aux} p_j                      (i in aux)
//   theta_v  = sum_{i in aux} alpha'_i * ces[i][v]            (v = 0, 1, 2)
//   y        = sum_{m in main} w_m * down(silu(gate(x*theta_0)) * up(x*theta_2) * theta_1)
// w_m is the raw probability p_m when the architecture does not renormalise (OLMoE, the
// release: norm_topk_prob=false; DeepSeek/Qwen by default). When it does (Mixtral,
// norm_topk_prob=true) w_m = p_m / (sum_{top-k} p + eps), as the release's code does
// (renormOver "top_k", the default), or with renormOver "main" p_m / (sum_{main} p + eps):
// exactly the weights plain top-k_m routing would give, so ces = ones is then the top-k_m
// model. The aux experts' probability mass is dropped. Shared experts are unchanged.
//
// Here: what the forward computes (its backward is in lib/train/backward.ts). Model.load
// checks or makes the ces tensors (prepareCompressedExperts, model.ts); enabling compressed
// experts on a model from a CLI flag is lib/methods/compressed_experts.ts.

import type { Routing, Tensor, TrainingBackend, Weight } from "../backend/backend.ts";
import { toFloat32 } from "../io/safetensors.ts";
import { cesName, cesWidth, type MoeSpec } from "./config.ts";
import type { Model } from "./model.ts";

/** Current ces values of layer l on the host, [E * 3 * d] (trainable: the master copy). */
export async function cesValues(model: Model, l: number): Promise<Float32Array> {
  const name = cesName(model.spec, l);
  const w = await model.weight(name);
  if (model.trainable.has(name)) return await (model.backend as TrainingBackend).readWeight(w);
  return toFloat32(await model.rawTensor(name));
}

/** Per token: main experts with their output weights, aux experts with alpha'. */
export interface CeRouting {
  /** [N, km] main expert ids and weights w_m. */
  mainIndices: Int32Array;
  mainWeights: Float32Array;
  /** [N, ka] aux expert ids and alpha' (sum to 1 per token). */
  auxIndices: Int32Array;
  auxAlpha: Float32Array;
  /** Per token sum of aux probabilities, and Z of w_m = p_m / Z (1 if not renormalising). */
  auxSum: Float32Array;
  mainDivisor: Float32Array;
}

/** Split a raw-probability top-k routing (sorted, not renormalised) into main and aux. */
export function splitRouting(raw: Routing, mlp: MoeSpec): CeRouting {
  const k = mlp.topK, km = mlp.mainExperts!, ka = k - km, n = raw.indices.length / k;
  const r: CeRouting = {
    mainIndices: new Int32Array(n * km),
    mainWeights: new Float32Array(n * km),
    auxIndices: new Int32Array(n * ka),
    auxAlpha: new Float32Array(n * ka),
    auxSum: new Float32Array(n),
    mainDivisor: new Float32Array(n).fill(1),
  };
  for (let t = 0; t < n; t++) {
    let mainSum = 0, auxSum = 0, topSum = 0;
    for (let j = 0; j < k; j++) topSum += raw.weights[t * k + j];
    for (let j = 0; j < km; j++) mainSum += raw.weights[t * k + j];
    for (let j = km; j < k; j++) auxSum += raw.weights[t * k + j];
    const over = mlp.renormOver === "main" ? mainSum : topSum;
    const z = mlp.renorm.normalize ? over + mlp.renorm.eps : 1;
    r.mainDivisor[t] = z;
    r.auxSum[t] = auxSum;
    for (let j = 0; j < km; j++) {
      r.mainIndices[t * km + j] = raw.indices[t * k + j];
      r.mainWeights[t * km + j] = raw.weights[t * k + j] / z;
    }
    for (let j = 0; j < ka; j++) {
      r.auxIndices[t * ka + j] = raw.indices[t * k + km + j];
      // auxSum is a sum of softmax outputs, > 0 unless every aux probability underflows.
      r.auxAlpha[t * ka + j] = auxSum > 0 ? raw.weights[t * k + km + j] / auxSum : 1 / ka;
    }
  }
  return r;
}

/**
 * theta per token on the backend, t0 [N, hidden] (gate input), t1 [N, expertWidth]
 * (intermediate), t2 [N, hidden] (up input): the aux alphas as a dense [N, E] matrix (zero
 * but at each token's aux experts) times each slot of ces, three matmuls. A host loop over
 * tokens and the upload of its three [N, hidden] results would, for a real model on a
 * GPU, outweigh the main experts' matmuls. Returns the alphas too (the backward's input
 * to dces); the caller frees all four.
 */
export async function thetaOf(
  model: Model,
  l: number,
  mlp: MoeSpec,
  ce: CeRouting,
): Promise<{ t0: Tensor; t1: Tensor; t2: Tensor; alpha: Tensor }> {
  const be = model.backend, E = mlp.experts;
  const n = ce.auxSum.length, ka = ce.auxIndices.length / n;
  const values = new Float32Array(n * E);
  for (let i = 0; i < n * ka; i++) {
    values[Math.floor(i / ka) * E + ce.auxIndices[i]] = ce.auxAlpha[i];
  }
  const alpha = be.tensor(values, [n, E]);
  const [t0, t1, t2] = (await cesSlots(model, l, mlp, true)).map((slot) => be.matmul(alpha, slot));
  return { t0, t1, t2, alpha };
}

/**
 * The three slots of layer l's ces transposed, [cols, E] each (cols: hidden for slots 0
 * and 2, the expert width for 1), kept on the model (Model.derivedWeight: released with
 * ces). `fresh`: rebuilt if ces trains (it changes at every optimizer step); the backward
 * reuses the forward's. ces is read only to build them: a decoded token reads nothing.
 */
export async function cesSlots(
  model: Model,
  l: number,
  mlp: MoeSpec,
  fresh: boolean,
): Promise<Weight[]> {
  const s = model.spec, E = mlp.experts, d = cesWidth(s, mlp), name = cesName(s, l);
  let ces: Promise<Float32Array> | undefined; // read once, for whichever slot builds first
  const slots: Weight[] = [];
  for (const v of [0, 1, 2]) {
    const cols = v === 1 ? mlp.expertWidth : s.hidden;
    const build = async () => {
      const values = await (ces ??= cesValues(model, l));
      const w = new Float32Array(cols * E);
      for (let e = 0; e < E; e++) {
        for (let c = 0; c < cols; c++) w[c * E + e] = values[e * 3 * d + v * d + c];
      }
      return { name, dtype: "F32" as const, shape: [cols, E], bytes: new Uint8Array(w.buffer) };
    };
    const key = `${name} <slot ${v} transposed>`;
    slots.push(await model.derivedWeight(key, [name], build, fresh && model.trainable.has(name)));
  }
  return slots;
}
