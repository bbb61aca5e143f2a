// Shared by the compressed-experts tests: a plain per-token reference of the CE MoE
// block, and helpers to load a fixture with CE enabled and random ces vectors.

import assert from "node:assert";
import type { Backend } from "../lib/backend/backend.ts";
import { topKIndices } from "../lib/backend/cpu.ts";
import { toFloat32 } from "../lib/io/safetensors.ts";
import {
  cesName,
  cesWidth,
  expertName,
  type MlpSpec,
  type RenormOver,
  routerName,
  sharedGateName,
  sharedName,
} from "../lib/model/config.ts";
import { forward } from "../lib/model/decoder.ts";
import { cesShape, Model } from "../lib/model/model.ts";
import { enableOnModel } from "../lib/methods/compressed_experts.ts";

type Moe = Extract<MlpSpec, { kind: "moe" }>;

export const INPUT = Int32Array.from({ length: 2 * 7 }, (_, i) => (i * 37 + 5) % 200);
export const SHAPE = { batch: 2, seqLen: 7 };

/** Deterministic values in [lo, hi). */
export function uniform(n: number, seed: number, lo: number, hi: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13, s ^= s >>> 17, s ^= s << 5;
    out[i] = lo + ((s >>> 0) / 4294967296) * (hi - lo);
  }
  return out;
}

/**
 * Load `dir` with compressed experts (k_m main, main weights renormalised over
 * `renormOver`: the default's when not given) and, with a seed, random ces in [0.5, 1.5).
 */
export async function loadCe(
  dir: string,
  backend: Backend,
  mainExperts: number,
  seed?: number,
  renormOver?: RenormOver,
): Promise<Model> {
  const model = await Model.load(dir, backend);
  enableOnModel(model, mainExperts, "test", renormOver);
  if (seed !== undefined) {
    model.spec.layers.forEach((layer, l) => {
      if (layer.mlp.kind !== "moe") return;
      const shape = cesShape(model, layer.mlp);
      const v = uniform(shape[0] * shape[1] * shape[2], seed + l, 0.5, 1.5);
      model.putTensor({
        name: cesName(model.spec, l),
        dtype: "F32",
        shape,
        bytes: new Uint8Array(v.buffer),
      });
    });
  }
  return model;
}

async function f32(model: Model, name: string): Promise<Float32Array> {
  return toFloat32(await model.rawTensor(name));
}

/** y [out] = W [out, in] @ x [in]. */
function matvec(w: Float32Array, x: Float32Array, outDim: number): Float32Array {
  const inDim = x.length, y = new Float32Array(outDim);
  for (let o = 0; o < outDim; o++) {
    let s = 0;
    for (let i = 0; i < inDim; i++) s += w[o * inDim + i] * x[i];
    y[o] = s;
  }
  return y;
}
const silu = (v: number) => v / (1 + Math.exp(-v));

/**
 * The CE MoE block written per token from the paper's equations (routed part plus the
 * shared experts), on the host in f64 accumulation: xn [N, H] -> [N, H].
 */
export async function referenceCeBlock(
  model: Model,
  l: number,
  xn: Float32Array,
): Promise<Float32Array> {
  const s = model.spec, mlp = s.layers[l].mlp as Moe, H = s.hidden, W = mlp.expertWidth;
  const d = cesWidth(s, mlp), k = mlp.topK, km = mlp.mainExperts!;
  const n = xn.length / H, out = new Float32Array(n * H);
  const router = await f32(model, routerName(s, l));
  const ces = await f32(model, cesName(s, l));
  const ex = async (e: number, p: "gate" | "up" | "down") =>
    await f32(model, expertName(s, l, e, p));
  for (let t = 0; t < n; t++) {
    const x = xn.subarray(t * H, (t + 1) * H);
    const logits = matvec(router, x, mlp.experts);
    const m = Math.max(...logits);
    const ps = logits.map((v) => Math.exp(v - m));
    const z = ps.reduce((a, b) => a + b, 0);
    const p = ps.map((v) => v / z);
    const top = topKIndices(p, k), main = top.slice(0, km), aux = top.slice(km);
    const auxSum = aux.reduce((a, i) => a + p[i], 0);
    // The release renormalises the top-k weights, then drops the aux experts' mass;
    // "main" renormalises over the main experts only (plain top-k_m's weights).
    const renormSum = (mlp.renormOver === "main" ? main : top).reduce((a, i) => a + p[i], 0);
    const theta = [new Float32Array(H), new Float32Array(W), new Float32Array(H)];
    for (const i of aux) {
      const alpha = p[i] / auxSum;
      for (let c = 0; c < H; c++) theta[0][c] += alpha * ces[(i * 3 + 0) * d + c];
      for (let c = 0; c < W; c++) theta[1][c] += alpha * ces[(i * 3 + 1) * d + c];
      for (let c = 0; c < H; c++) theta[2][c] += alpha * ces[(i * 3 + 2) * d + c];
    }
    for (const e of main) {
      const wm = mlp.renorm.normalize ? p[e] / (renormSum + mlp.renorm.eps) : p[e];
      const g = matvec(await ex(e, "gate"), x.map((v, c) => v * theta[0][c]), W);
      const u = matvec(await ex(e, "up"), x.map((v, c) => v * theta[2][c]), W);
      const a = g.map((gv, c) => silu(gv) * u[c] * theta[1][c]);
      const y = matvec(await ex(e, "down"), a, H);
      for (let c = 0; c < H; c++) out[t * H + c] += wm * y[c];
    }
    if (mlp.sharedWidth > 0) {
      const sg = await f32(model, sharedName(s, l, "gate"));
      const su = await f32(model, sharedName(s, l, "up"));
      const sd = await f32(model, sharedName(s, l, "down"));
      const g = matvec(sg, x, mlp.sharedWidth), u = matvec(su, x, mlp.sharedWidth);
      let y = matvec(sd, g.map((gv, c) => silu(gv) * u[c]), H);
      if (mlp.sharedGate) {
        const gl = matvec(await f32(model, sharedGateName(l)), x, 1)[0];
        y = y.map((v) => v / (1 + Math.exp(-gl)));
      }
      for (let c = 0; c < H; c++) out[t * H + c] += y[c];
    }
  }
  return out;
}

/**
 * Forward the model, and forward again with every CE block replaced by the reference;
 * returns the max |logit difference| relative to the largest |logit|.
 */
export async function ceVersusReference(model: Model): Promise<number> {
  const be = model.backend;
  const got = await forward(model, INPUT, SHAPE);
  const want = await forward(model, INPUT, SHAPE, {
    mlpOverride: async (l, xnT) => {
      if (model.spec.layers[l].mlp.kind !== "moe") return undefined;
      const y = await referenceCeBlock(model, l, await be.read(xnT));
      return be.tensor(y, [y.length / model.spec.hidden, model.spec.hidden]);
    },
  });
  return relMaxDiff(got.logits, want.logits);
}

export function relMaxDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let maxAbs = 0, maxDiff = 0;
  for (let i = 0; i < a.length; i++) {
    maxAbs = Math.max(maxAbs, Math.abs(b[i]));
    maxDiff = Math.max(maxDiff, Math.abs(a[i] - b[i]));
  }
  return maxDiff / maxAbs;
}

/** Main experts k/2 (at least 1) of the first MoE layer's top-k. */
export function defaultMain(model: Model): number {
  const moe = model.spec.layers.find((l) => l.mlp.kind === "moe")!.mlp as Moe;
  return Math.max(1, Math.floor(moe.topK / 2));
}
