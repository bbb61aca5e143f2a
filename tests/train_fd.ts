// Finite-difference checking for the backward ops and the model backward: perturb one
// f32 input entry at a time by +-h, evaluate a scalar loss in doubles, and compare the
// central difference with the analytic gradient. The forward ops store f32, so the
// loss carries ~1e-7 relative rounding noise: with h = 1e-2 the central difference is
// good to ~1e-4 relative, far below the O(1) error of a wrong index or factor.

import { type BatchShape, forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { writeCondensedCheckpoint } from "../lib/methods/condense.ts";
import type { Plan } from "../lib/methods/plan.ts";
import type { Grads } from "../lib/train/backward.ts";
import assert from "node:assert";
import { type Backend, numelOf } from "../lib/backend/backend.ts";
import { lossAndGrad } from "../lib/train/backward.ts";

/** Central-difference gradient of loss() with respect to every entry of `x` (listed in `entries`). */
export async function finiteDifference(
  x: Float32Array,
  loss: () => Promise<number>,
  h = 1e-2,
  entries: Iterable<number> = x.keys(),
): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  for (const i of entries) {
    const orig = x[i];
    x[i] = orig + h;
    const up = x[i];
    const lp = await loss();
    x[i] = orig - h;
    const down = x[i];
    const lm = await loss();
    x[i] = orig;
    // the f32 steps actually taken, not the nominal 2h
    out.set(i, (lp - lm) / (up - down));
  }
  return out;
}

/** max |fd - analytic| over the checked entries / max |analytic| over the whole gradient. */
export function fdError(fd: Map<number, number>, analytic: ArrayLike<number>): number {
  let d = 0, m = 0;
  for (const [i, g] of fd) d = Math.max(d, Math.abs(g - analytic[i]));
  for (let i = 0; i < analytic.length; i++) m = Math.max(m, Math.abs(analytic[i]));
  return m === 0 ? d : d / m;
}

/** sum_i r_i y_i in doubles: the scalar whose gradient with respect to y is r. */
export function dotLoss(y: ArrayLike<number>, r: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < y.length; i++) s += y[i] * r[i];
  return s;
}

// ---- whole-model checks (tests/train_model_test.ts, tests/ce_train_test.ts) ----------

/** The fixed 2 x 7 batch the model checks use: next-token targets, the last of each row ignored. */
export function trainingBatch(vocab: number) {
  const shape = { batch: 2, seqLen: 7 };
  const ids = Int32Array.from({ length: 14 }, (_, i) => (i * 37 + 11) % vocab);
  const targets = Int32Array.from(ids, (_, i) => (i % 7 === 6 ? -100 : ids[i + 1]));
  return { shape, ids, targets };
}

/** Zeroed f32 gradient buffers for `names` (which must already be marked trainable). */
export async function zeroGrads(model: Model, names: string[]): Promise<Grads> {
  const grads: Grads = new Map();
  for (const n of names) {
    const wt = await model.weight(n);
    grads.set(n, model.backend.tensor(new Float32Array(numelOf(wt.shape)), wt.shape));
  }
  return grads;
}

/** Mean next-token cross-entropy of the decoder forward, in doubles, plus its routing. */
export async function decoderLoss(
  model: Model,
  ids: Int32Array,
  targets: Int32Array,
  shape: BatchShape,
) {
  const r = await forward(model, ids, shape, { collectRouter: true });
  const v = model.spec.vocab;
  let sum = 0, n = 0;
  for (let i = 0; i < targets.length; i++) {
    if (targets[i] < 0) continue;
    let max = -Infinity;
    for (let j = 0; j < v; j++) max = Math.max(max, r.logits[i * v + j]);
    let s = 0;
    for (let j = 0; j < v; j++) s += Math.exp(r.logits[i * v + j] - max);
    sum += Math.log(s) + max - r.logits[i * v + targets[i]];
    n++;
  }
  const routing = [...r.routing!.values()].map((x) => Array.from(x.indices).join()).join("|");
  return { loss: sum / n, routing };
}

/**
 * Pins the backend's top-k choices (which experts, in which order) to those of the
 * forward run just before `pin()`: from then on each routeTopK call of a forward returns
 * the choice its call made then, weighted by the current router probabilities (softmax
 * in doubles, renormalised over the pinned experts where asked). The backward holds the
 * selection constant, so central differences of the pinned loss check it at every
 * entry, also where a step would flip a near-tied choice (the loss jumps there).
 * `start()` before each forward; `unpin()` restores the backend.
 */
export function pinTopK(be: Backend) {
  const own = be.routeTopK;
  const chosen: Int32Array[] = [];
  let pinned = false, call = 0;
  be.routeTopK = async (logits, k, normalize, eps) => {
    if (!pinned) {
      const r = await own.call(be, logits, k, normalize, eps);
      chosen.push(r.indices.slice());
      return r;
    }
    const indices = chosen[call++];
    assert(indices && indices.length % k === 0, `pinned routing: no call ${call} recorded`);
    const [n, e] = logits.shape, ls = await be.read(logits);
    const weights = new Float32Array(n * k), p = new Float64Array(e);
    for (let r = 0; r < n; r++) {
      let max = -Infinity, sum = 0, picked = 0;
      for (let j = 0; j < e; j++) max = Math.max(max, ls[r * e + j]);
      for (let j = 0; j < e; j++) sum += p[j] = Math.exp(ls[r * e + j] - max);
      for (let j = 0; j < k; j++) picked += p[indices[r * k + j]] / sum;
      for (let j = 0; j < k; j++) {
        const w = p[indices[r * k + j]] / sum;
        weights[r * k + j] = normalize ? w / (picked + eps) : w;
      }
    }
    return { indices: indices.slice(), weights };
  };
  return {
    pin: () => void (pinned = true),
    start: () => void (call = 0),
    /** Every recorded call was replayed by the last forward (the same code path ran). */
    replayedAll: () => call === chosen.length,
    unpin: () => void (be.routeTopK = own),
  };
}

/** A forward's decoder loss with pinned top-k choices (see pinTopK). */
export async function pinnedLoss(
  model: Model,
  batch: ReturnType<typeof trainingBatch>,
  pins: ReturnType<typeof pinTopK>,
): Promise<number> {
  pins.start();
  const { loss } = await decoderLoss(model, batch.ids, batch.targets, batch.shape);
  assert(pins.replayedAll(), "pinned routing: the forward made other routeTopK calls");
  return loss;
}

/**
 * Loss and gradients of `names` (no routed expert among them) with the frozen routed
 * experts grouped from their stacks, against the same with every routed expert trainable
 * too (so run one by one, their own gradients unused): in tape then recompute mode,
 * accumulated. `moeLayers` are checked to take each path.
 */
export async function groupedVersusOneByOne(
  load: () => Promise<Model>,
  names: string[],
  moeLayers: number[],
): Promise<void> {
  const runs: { losses: number[]; grads: Float32Array[] }[] = [];
  for (const grouped of [true, false]) {
    const model = await load();
    const experts = grouped
      ? []
      : [...model.ckpt.files.keys()].filter((n) => /\.experts\.\d+\./.test(n));
    const all = [...names, ...experts];
    for (const n of all) model.makeTrainable(n);
    for (const l of moeLayers) assert.equal(model.expertsStackable(l), grouped, `layer ${l}`);
    const { ids, targets, shape } = trainingBatch(model.spec.vocab);
    const grads = await zeroGrads(model, all), losses = [];
    for (const recompute of [false, true]) {
      losses.push((await lossAndGrad(model, ids, targets, shape, grads, { recompute })).loss);
    }
    runs.push({ losses, grads: await model.backend.readAll(names.map((n) => grads.get(n)!)) });
    model.close();
  }
  const [grouped, oneByOne] = runs;
  grouped.losses.forEach((a, i) => {
    const b = oneByOne.losses[i];
    assert(Math.abs(a - b) <= 1e-6 * Math.abs(b), `loss ${a} grouped, ${b} one by one`);
  });
  names.forEach((n, i) => {
    const [a, b] = [grouped.grads[i], oneByOne.grads[i]];
    let worst = 0, largest = 0;
    for (let j = 0; j < b.length; j++) {
      worst = Math.max(worst, Math.abs(a[j] - b[j])), largest = Math.max(largest, Math.abs(b[j]));
    }
    assert(largest > 0 && worst <= 1e-5 * largest, `${n}: ${worst} of ${largest}`);
  });
}

/** Layers to condense: [layer, kept experts, their wbar]. */
export type Condensed = [number, number[], number[]][];

/**
 * A condensed checkpoint of `src`, written by writeCondensedCheckpoint into a temp folder
 * (the caller removes the folder above it): the real folder a user fine-tunes.
 */
export async function condensedCheckpoint(src: string, layers: Condensed): Promise<string> {
  const plan: Plan = new Map();
  for (const [l, experts, wbar] of layers) plan.set(l, { kind: "condense", experts, wbar });
  const model = await Model.load(src, new CpuBackend());
  const out = `${await Deno.makeTempDir()}/condensed`;
  const provenance = {
    source: src,
    source_hash: "-",
    search: null,
    variant: "test",
    num_changed: plan.size,
  };
  await writeCondensedCheckpoint(model, plan, out, provenance);
  model.close();
  return out;
}
