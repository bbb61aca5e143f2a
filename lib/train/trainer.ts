// Fine-tuning around lib/train/backward.ts: which tensors train, the data (tokenised,
// padded with masked labels or packed), a seeded order, AdamW with gradient
// accumulation, global-norm clipping and linear/cosine schedules, and the resumable state
// (trainable weights + optimizer moments + step in one safetensors file, written atomically).

import type { Tensor, TrainingBackend, Weight } from "../backend/backend.ts";
import { numelOf } from "../backend/backend.ts";
import { readTensor, tensorInfo, writeCheckpointFolder } from "../io/checkpoint.ts";
import {
  type DType,
  f32Tensor,
  f32ToBf16Bits,
  parseHeader,
  type RawTensor,
  toFloat32,
  writeSafetensors,
} from "../io/safetensors.ts";
import type { TextTokenizer } from "../io/tokenizer.ts";
import { UsageError } from "../cli.ts";
import { DataError, readCalibrationTexts } from "../methods/calibration.ts";
import { cesNames, compressedExpertsConfig } from "../methods/compressed_experts.ts";
import { denseName, layerPrefix, sharedGateName } from "../model/config.ts";
import type { Model } from "../model/model.ts";
import { type Grads, lossAndGrad } from "./backward.ts";
import { mulberry32 } from "../random.ts";

export const IGNORE_INDEX = -100;

/** Training stopped on a non-finite loss or gradient (reported without a stack trace). */
export class TrainingDivergedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "TrainingDivergedError";
  }
}

// ---- which tensors train ----------------------------------------------------------

/**
 * Names of the trainable tensors for a selection:
 * - "condensed": the dense MLP (gate/up/down) of every layer a condensed checkpoint marks
 *   "condense" (shared + kept experts with wbar folded into down), plus a Qwen gated
 *   shared expert kept beside it;
 * - "experts": every routed and shared expert tensor (not routers);
 * - "all": every tensor (with compressed experts: their ces too);
 * - "ces": the compressed-experts vectors only; "ces+main": ces plus every expert tensor;
 * - otherwise comma-separated patterns: /regex/ or a glob (* = any run of characters).
 * A selection matching nothing is a UsageError.
 */
export function selectTrainable(model: Model, selection: string): string[] {
  // ces of compressed experts may exist only in memory (initialised to ones)
  const ces = cesNames(model);
  const names = [...new Set([...model.ckpt.files.keys(), ...ces])].sort();
  const experts = () =>
    names.filter((n) => /\.(experts\.\d+|shared_experts?)\.[a-z_]+\.weight$/.test(n));
  let out: string[];
  if (selection === "all") out = names;
  else if (selection === "ces" || selection === "ces+main") {
    if (ces.length === 0) {
      throw new UsageError(
        `--trainable ${selection}: ${model.ckpt.dir} has no compressed experts ` +
          `(add "compressed_experts" to its config.json or pass --main-experts K)`,
      );
    }
    out = selection === "ces" ? ces : [...ces, ...experts()].sort();
  } else if (selection === "experts") {
    out = names.filter((n) => /\.(experts\.\d+|shared_experts?)\.[a-z_]+\.weight$/.test(n));
  } else if (selection === "condensed") {
    const condensed = condensedLayers(model);
    if (condensed.length === 0) {
      throw new UsageError(
        `--trainable condensed: ${model.ckpt.dir} has no condensed layers (write one with deno task condense)`,
      );
    }
    const wanted = new Set<string>();
    for (const l of condensed) {
      for (const p of ["gate", "up", "down"] as const) wanted.add(denseName(l, p));
      const gated = `${layerPrefix(l)}mlp.shared_expert.`;
      for (const n of names) if (n.startsWith(gated)) wanted.add(n);
      wanted.add(sharedGateName(l));
    }
    out = names.filter((n) => wanted.has(n));
  } else {
    out = [];
    for (const pattern of selection.split(",").map((p) => p.trim()).filter((p) => p)) {
      const re = patternRegex(pattern);
      const hit = names.filter((n) => re.test(n));
      if (hit.length === 0) {
        throw new UsageError(`--trainable pattern "${pattern}" matches no tensor`);
      }
      out.push(...hit);
    }
    out = [...new Set(out)].sort();
  }
  if (out.length === 0) throw new UsageError(`--trainable ${selection} selects no tensor`);
  return out;
}

function patternRegex(pattern: string): RegExp {
  if (pattern.length > 2 && pattern.startsWith("/") && pattern.endsWith("/")) {
    try {
      return new RegExp(pattern.slice(1, -1));
    } catch (e) {
      throw new UsageError(`--trainable: bad regex ${pattern} (${(e as Error).message})`);
    }
  }
  const escaped = pattern.replace(/[.+?^${}()|[\]\\]/g, "\\$&").replaceAll("*", ".*");
  return new RegExp(`^${escaped}$`);
}

/** Layers the checkpoint's "cdmoe" section marks as condensed. */
export function condensedLayers(model: Model): number[] {
  const cd = model.ckpt.config.cdmoe as
    | { layers?: Record<string, { change?: string }> }
    | undefined;
  return Object.entries(cd?.layers ?? {})
    .filter(([, c]) => c.change === "condense")
    .map(([l]) => Number(l))
    .sort((a, b) => a - b);
}

// ---- schedules ----------------------------------------------------------------------

export type Schedule = "linear" | "cosine" | "constant";

/**
 * lr at optimizer step `step` (1-based) of `total`: linear warmup from 0, then decay to 0,
 * as Hugging Face's schedulers (get_linear/cosine/constant_schedule_with_warmup), whose
 * LambdaLR gives update i (0-based) the factor i / warmup while i < warmup: the first
 * update of a warmup runs at lr 0.
 */
export function learningRate(
  step: number,
  total: number,
  base: number,
  schedule: Schedule,
  warmup = 0,
): number {
  if (warmup > 0 && step <= warmup) return (base * (step - 1)) / warmup;
  const span = Math.max(1, total - warmup);
  const done = Math.min(1, (step - warmup - 1) / span); // 0 at the first decayed step
  if (schedule === "linear") return base * (1 - done); // as HF get_linear_schedule_with_warmup
  if (schedule === "cosine") return base * 0.5 * (1 + Math.cos(Math.PI * done));
  return base;
}

// ---- data ---------------------------------------------------------------------------

/** Texts of a JSON-lines file with "text", or of the reference's {"instances":[{"text":..}]}. */
export async function readTrainingTexts(path: string): Promise<string[]> {
  let raw: string;
  try {
    raw = await Deno.readTextFile(path);
  } catch (e) {
    throw new DataError(path, `cannot read (${(e as Error).message})`);
  }
  const trimmed = raw.trim();
  if (trimmed.startsWith("{") && trimmed.includes('"instances"')) {
    let obj: unknown = null;
    try {
      obj = JSON.parse(trimmed);
    } catch {
      // not one JSON document: fall through to JSON lines
    }
    const instances = (obj as { instances?: unknown } | null)?.instances;
    if (Array.isArray(instances)) {
      const texts = instances
        .map((x) => (x as { text?: unknown } | null)?.text)
        .filter((t): t is string => typeof t === "string" && t.length > 0);
      if (texts.length === 0) {
        throw new DataError(path, `no "instances" entry has a non-empty "text"`);
      }
      return texts;
    }
  }
  return await readCalibrationTexts(path);
}

/** One training sequence: ids [len] and next-token targets [len] (IGNORE_INDEX = no loss). */
export interface Sequence {
  ids: Int32Array;
  targets: Int32Array;
}

export interface DataOptions {
  length: number;
  /** Concatenate documents (separated by EOS when the tokenizer has one) into full rows. */
  pack: boolean;
  /** Padded positions get IGNORE_INDEX targets (default); false trains on the pad token as the reference does. */
  maskPadding: boolean;
  bosTokenId: number | null;
}

/** Tokenise and cut into training sequences of at most `length` tokens. */
export function makeSequences(tok: TextTokenizer, texts: string[], opts: DataOptions): Sequence[] {
  const docs = texts.map((text) => {
    let ids = tok.encode(text, true);
    if (opts.bosTokenId !== null && ids[0] !== opts.bosTokenId) ids = [opts.bosTokenId, ...ids];
    return ids;
  });
  const out: Sequence[] = [];
  const L = opts.length;
  if (opts.pack) {
    const stream: number[] = [];
    for (const d of docs) stream.push(...d, ...(tok.eosId !== null ? [tok.eosId] : []));
    // windows of L + 1 tokens overlapping by one, so every position has its target
    for (let s = 0; s + L + 1 <= stream.length; s += L) {
      out.push({
        ids: Int32Array.from(stream.slice(s, s + L)),
        targets: Int32Array.from(stream.slice(s + 1, s + L + 1)),
      });
    }
  } else {
    for (const d of docs) {
      if (d.length < 2) continue;
      const n = Math.min(L, d.length - 1);
      out.push({
        ids: Int32Array.from(d.slice(0, n)),
        targets: Int32Array.from(d.slice(1, n + 1)),
      });
    }
  }
  return out;
}

/** Deterministic permutation of [0, n) for a seed and epoch (mulberry32 Fisher-Yates). */
export function shuffledOrder(n: number, seed: number, epoch: number): number[] {
  const next = mulberry32((seed * 0x9e3779b1 + epoch * 0x85ebca6b) >>> 0);
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

/**
 * Right-pad sequences to the longest into one [batch, seqLen] micro-batch. Causal
 * attention keeps padding invisible to real tokens; padded targets are IGNORE_INDEX
 * unless maskPadding is false (then the pad id, as the reference's collator does).
 */
export function padBatch(seqs: Sequence[], padId: number, maskPadding: boolean) {
  const seqLen = Math.max(...seqs.map((s) => s.ids.length));
  const ids = new Int32Array(seqs.length * seqLen).fill(padId);
  const targets = new Int32Array(seqs.length * seqLen).fill(maskPadding ? IGNORE_INDEX : padId);
  seqs.forEach((s, b) => {
    ids.set(s.ids, b * seqLen);
    targets.set(s.targets, b * seqLen);
  });
  return { ids, targets, shape: { batch: seqs.length, seqLen } };
}

// ---- optimizer ----------------------------------------------------------------------

export interface TrainHyper {
  lr: number;
  schedule: Schedule;
  warmup: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Clip the global gradient norm to this (0 = no clipping). */
  clip: number;
}

/** AdamW's usual moments and eps (PyTorch's defaults), which nothing here changes. */
export const ADAMW_DEFAULTS = { beta1: 0.9, beta2: 0.999, eps: 1e-8 } as const;

interface Param {
  name: string;
  weight: Weight;
  grad: Tensor;
  m: Tensor;
  v: Tensor;
  /** Whether weight decay applies (see decays). */
  decay: boolean;
}

/**
 * Whether AdamW's weight decay applies to tensor `name`. Not to biases and norm weights,
 * as Hugging Face's Trainer (get_decay_parameter_names: every LayerNorm/RMSNorm weight
 * and every "bias" is left out), nor to compressed experts' ces: multiplicative scales
 * that start at ones, which decay would pull toward 0 rather than toward their start.
 */
export function decays(name: string): boolean {
  return !(name.endsWith(".bias") || name.endsWith("norm.weight") || name.endsWith(".ces"));
}

/** The trainable tensors with their gradients and AdamW moments. */
export class Optimizer {
  readonly params: Param[] = [];
  step = 0;

  private constructor(readonly model: Model, readonly hyper: TrainHyper) {}

  /** Marks `names` trainable on the model (f32 master copies) and allocates grad, m, v. */
  static async create(model: Model, names: string[], hyper: TrainHyper): Promise<Optimizer> {
    const opt = new Optimizer(model, hyper);
    const be = model.backend as TrainingBackend;
    for (const name of names) model.makeTrainable(name);
    for (const name of names) {
      const weight = await model.weight(name);
      const zeros = () => be.tensor(new Float32Array(numelOf(weight.shape)), weight.shape);
      opt.params.push({ name, weight, grad: zeros(), m: zeros(), v: zeros(), decay: decays(name) });
    }
    return opt;
  }

  get grads(): Grads {
    return new Map(this.params.map((p) => [p.name, p.grad]));
  }

  get numParams(): number {
    return this.params.reduce((a, p) => a + numelOf(p.weight.shape), 0);
  }

  zeroGrad(): void {
    const be = this.model.backend as TrainingBackend;
    for (const p of this.params) be.zero(p.grad);
  }

  /** Clip by global norm, then one AdamW step at learning rate lr. Returns the norm before clipping. */
  async apply(lr: number): Promise<number> {
    const be = this.model.backend as TrainingBackend, h = this.hyper;
    const norm = Math.sqrt(await be.sumSquares(this.params.map((p) => p.grad)));
    const gradScale = h.clip > 0 && norm > h.clip ? h.clip / norm : 1;
    this.step++;
    for (const p of this.params) {
      be.adamwStep(p.weight, p.grad, p.m, p.v, {
        lr,
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.eps,
        weightDecay: p.decay ? h.weightDecay : 0,
        step: this.step,
        gradScale,
      });
    }
    return norm;
  }
}

/**
 * One optimizer step over micro-batches: the mean loss over every counted target of all
 * of them (gradient accumulation gives exactly the big batch's gradient). Returns the
 * loss, counted tokens and gradient norm.
 */
export async function trainStep(
  opt: Optimizer,
  micro: { ids: Int32Array; targets: Int32Array; shape: { batch: number; seqLen: number } }[],
  lr: number,
  recompute: boolean,
): Promise<{ loss: number; tokens: number; gradNorm: number }> {
  let total = 0;
  for (const m of micro) for (const t of m.targets) if (t !== IGNORE_INDEX) total++;
  if (total === 0) return { loss: NaN, tokens: 0, gradNorm: 0 };
  opt.zeroGrad();
  let lossSum = 0;
  const grads = opt.grads;
  for (const m of micro) {
    const r = await lossAndGrad(opt.model, m.ids, m.targets, m.shape, grads, {
      gradScale: 1 / total,
      recompute,
      ignoreIndex: IGNORE_INDEX,
    });
    lossSum += r.loss * r.count;
  }
  const loss = lossSum / total;
  if (!Number.isFinite(loss)) return { loss, tokens: total, gradNorm: NaN };
  const gradNorm = await opt.apply(lr);
  return { loss, tokens: total, gradNorm };
}

// ---- state and checkpoints ----------------------------------------------------------

export interface StateInfo {
  step: number;
  /** Identifies the model and trainable set: a resume must match. */
  model_fingerprint: string;
  trainable: string[];
  /** Anything else the script wants back (loss curve, options). */
  extra: unknown;
}

/** What a resume must match: every tensor's name, dtype and shape of the source. */
export function modelFingerprint(model: Model): string {
  const parts: string[] = [];
  for (const name of [...model.ckpt.files.keys()].sort()) {
    const info = tensorInfo(model.ckpt, name)!;
    parts.push(`${name}:${info.dtype}:${info.shape.join("x")}`);
  }
  let h = 2166136261 >>> 0; // FNV-1a over the list
  for (const c of parts.join(";")) h = Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0;
  return `${model.spec.modelType}-${parts.length}-${h.toString(16)}`;
}

/** Trainable f32 values and AdamW moments plus StateInfo, in one file written atomically. */
export async function saveState(path: string, opt: Optimizer, info: StateInfo): Promise<void> {
  const be = opt.model.backend as TrainingBackend;
  const tensors: RawTensor[] = [];
  for (const p of opt.params) {
    const shape = [...p.weight.shape];
    tensors.push(f32Tensor(`param/${p.name}`, shape, await be.readWeight(p.weight)));
    tensors.push(f32Tensor(`m/${p.name}`, shape, (await be.read(p.m)).slice()));
    tensors.push(f32Tensor(`v/${p.name}`, shape, (await be.read(p.v)).slice()));
  }
  await writeSafetensors(path, tensors, {
    format: "moe-condense-train",
    info: JSON.stringify(info),
  });
}

/** Read a state file's info and tensors (checked against the model by the caller). */
export async function loadState(
  path: string,
): Promise<{ info: StateInfo; tensors: Map<string, Float32Array> }> {
  const bytes = await Deno.readFile(path);
  const headerLen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const header = parseHeader(path, bytes.subarray(8, 8 + headerLen), bytes.length);
  const meta = header.metadata ?? {};
  if (meta.format !== "moe-condense-train" || !meta.info) {
    throw new UsageError(`${path}: not a moe-condense training state`);
  }
  const tensors = new Map<string, Float32Array>();
  for (const [name, t] of header.tensors) {
    const raw = { name, dtype: t.dtype, shape: t.shape, bytes: bytes.subarray(t.begin, t.end) };
    tensors.set(name, toFloat32(raw));
  }
  return { info: JSON.parse(meta.info) as StateInfo, tensors };
}

/** Put a loaded state's values and moments into the optimizer (same names and shapes). */
export async function restoreState(
  opt: Optimizer,
  tensors: Map<string, Float32Array>,
  step: number,
) {
  const be = opt.model.backend as TrainingBackend;
  for (const p of opt.params) {
    const get = (kind: string) => {
      const t = tensors.get(`${kind}/${p.name}`);
      if (!t || t.length !== numelOf(p.weight.shape)) {
        throw new UsageError(`resume state has no matching ${kind} for "${p.name}"`);
      }
      return t;
    };
    opt.model.release(p.name);
    opt.model.putTensor(f32Tensor(p.name, [...p.weight.shape], get("param")));
    p.weight = await opt.model.weight(p.name);
    be.free(p.m), be.free(p.v);
    p.m = be.tensor(get("m").slice(), p.weight.shape);
    p.v = be.tensor(get("v").slice(), p.weight.shape);
  }
  opt.step = step;
}

function f32ToF16Bits(x: number): number {
  const f = new Float32Array([x]), u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000, exp = ((u >>> 23) & 0xff) - 127 + 15;
  let mant = u & 0x7fffff;
  if (((u >>> 23) & 0xff) === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  if (exp >= 31) return sign | 0x7c00;
  if (exp <= 0) {
    if (exp < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - exp;
    const half = 1 << (shift - 1);
    let r = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    if (rest > half || (rest === half && (r & 1))) r++;
    return sign | r;
  }
  let r = (exp << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (r & 1))) r++;
  return sign | r;
}

/** f32 values as a RawTensor of `dtype` (round to nearest even). */
export function castTensor(
  name: string,
  shape: number[],
  data: Float32Array,
  dtype: DType,
): RawTensor {
  if (dtype === "F32") return f32Tensor(name, shape, data);
  if (dtype === "BF16") {
    return { name, dtype, shape, bytes: new Uint8Array(f32ToBf16Bits(data).buffer) };
  }
  if (dtype === "F16") {
    const h = Uint16Array.from(data, f32ToF16Bits);
    return { name, dtype, shape, bytes: new Uint8Array(h.buffer) };
  }
  throw new Error(`cannot write "${name}" as ${dtype}`);
}

/**
 * Write the fine-tuned model as an HF-layout folder (a temp folder renamed at the end):
 * frozen tensors copied as they are, trained ones rounded from their f32 master copy to
 * the source dtype. `configExtra` is merged into config.json (provenance).
 */
export async function writeTrainedCheckpoint(
  opt: Optimizer,
  outDir: string,
  configExtra: Record<string, unknown>,
): Promise<void> {
  const model = opt.model, be = model.backend as TrainingBackend;
  const trained = new Map(opt.params.map((p) => [p.name, p]));
  await writeCheckpointFolder(model.ckpt, outDir, async (tmp, weights) => {
    const tensors: RawTensor[] = [];
    // ces kept only in memory (compressed experts enabled by a flag) are written in f32
    for (const name of cesNames(model)) {
      if (model.ckpt.files.has(name)) continue;
      const p = trained.get(name);
      tensors.push(
        p
          ? castTensor(name, [...p.weight.shape], await be.readWeight(p.weight), "F32")
          : await model.rawTensor(name),
      );
    }
    for (const name of model.ckpt.files.keys()) {
      const p = trained.get(name);
      if (!p) {
        tensors.push(await readTensor(model.ckpt, name));
        continue;
      }
      const info = tensorInfo(model.ckpt, name)!;
      tensors.push(castTensor(name, [...info.shape], await be.readWeight(p.weight), info.dtype));
    }
    await weights(tensors);
    const ce = compressedExpertsConfig(model);
    const config = {
      ...model.ckpt.config,
      ...(ce ? { compressed_experts: ce } : {}),
      ...configExtra,
    };
    await Deno.writeTextFile(`${tmp}/config.json`, JSON.stringify(config, null, 2) + "\n");
  });
}

// ---- evaluation ---------------------------------------------------------------------

/**
 * Held-out loss of the model's ordinary forward (lib/model/decoder.ts) on sequences:
 * mean nats per counted token and bits per UTF-8 byte of the predicted tokens' text.
 */
export async function evaluate(
  model: Model,
  tok: TextTokenizer,
  seqs: Sequence[],
  batch: number,
): Promise<{ loss: number; bitsPerByte: number; tokens: number; bytes: number }> {
  const { forward } = await import("../model/decoder.ts");
  let nats = 0, tokens = 0, bytes = 0;
  const v = model.spec.vocab;
  for (let i = 0; i < seqs.length; i += batch) {
    const group = seqs.slice(i, i + batch);
    const b = padBatch(group, 0, true);
    const { logits } = await forward(model, b.ids, b.shape);
    for (let r = 0; r < b.targets.length; r++) {
      const t = b.targets[r];
      if (t === IGNORE_INDEX) continue;
      let max = -Infinity;
      for (let j = 0; j < v; j++) max = Math.max(max, logits[r * v + j]);
      let s = 0;
      for (let j = 0; j < v; j++) s += Math.exp(logits[r * v + j] - max);
      nats += Math.log(s) + max - logits[r * v + t];
      tokens++;
    }
    for (const s of group) {
      bytes += new TextEncoder().encode(tok.decode(Array.from(s.targets), true)).length;
    }
  }
  return { loss: nats / tokens, bitsPerByte: nats / Math.LN2 / bytes, tokens, bytes };
}
