// A loaded model: its spec, its checkpoint (opened lazily) and the weights resident on
// a backend. Weights are uploaded on first use; the layer-wise mode releases each
// layer's weights after use so only one layer is resident at a time.

import {
  type Backend,
  GATE_UP_RUN,
  numelOf,
  supportsTraining,
  type Weight,
} from "../backend/backend.ts";
import {
  type Checkpoint,
  CheckpointError,
  closeCheckpoint,
  openCheckpoint,
  readTensor,
} from "../io/checkpoint.ts";
import { type RawTensor, toFloat32 } from "../io/safetensors.ts";
import {
  cesName,
  cesWidth,
  ConfigError,
  expertName,
  layerPrefix,
  type MlpNames,
  type ModelSpec,
  type MoeSpec,
  parseModelConfig,
} from "./config.ts";

/** Model.expertStack's projections. */
export type ExpertStackProj = "gate_up" | "gate" | "up" | "down";

export class Model {
  private weights = new Map<string, Weight>();
  /** Each layer's expert matrices stacked per projection, for groupedMatmul. */
  private stacks = new Map<string, { weight: Weight; bytes: number; members: string[] }>();
  /** Tensors put in memory (an in-memory condensed model); they shadow the checkpoint. */
  private extra = new Map<string, RawTensor>();
  /** Bytes of weights currently resident on the backend (checkpoint dtype). */
  residentBytes = 0;
  peakResidentBytes = 0;
  /** Names uploaded as f32 trainable weights (lib/train); the rest stay in checkpoint dtype. */
  readonly trainable = new Set<string>();

  /**
   * Whether inference may run from stacks (expertStack, mlpStack, rowStack). Training
   * reads every weight by name (its tape, the f32 master copies), so a model with
   * trainable weights has none: both copies would be resident.
   */
  get stacking(): boolean {
    return this.trainable.size === 0;
  }

  /**
   * Whether layer l's routed experts run from their stacks (expertStack): always when
   * stacking, and in training where none of them trains (training backpropagates through
   * frozen experts grouped like inference; trainable ones run one by one on their f32
   * master copies).
   */
  expertsStackable(l: number): boolean {
    if (this.stacking) return true;
    const mlp = this.spec.layers[l].mlp;
    if (mlp.kind !== "moe") return false;
    for (let e = 0; e < mlp.experts; e++) {
      for (const part of ["gate", "up", "down"] as const) {
        if (this.trainable.has(expertName(this.spec, l, e, part))) return false;
      }
    }
    return true;
  }

  /**
   * A weight built from other tensors (`members`), kept like a stack: released with any of
   * them. `rebuild` replaces the kept one (its members changed: trainable ones do at every
   * optimizer step). `build` runs only then, so what it reads is read only then.
   */
  async derivedWeight(
    key: string,
    members: string[],
    build: () => Promise<RawTensor>,
    rebuild: boolean,
  ): Promise<Weight> {
    const cached = this.stacks.get(key);
    if (cached && !rebuild) return cached.weight;
    if (cached) this.release(key);
    const raw = await build();
    return this.keepStack(key, members, raw, raw.bytes.length);
  }

  /** Marks `name` trainable: an f32 master copy from its next use on; the stacks go. */
  makeTrainable(name: string): void {
    this.release(name);
    this.trainable.add(name);
    for (const key of [...this.stacks.keys()]) this.release(key);
  }

  constructor(readonly spec: ModelSpec, readonly ckpt: Checkpoint, readonly backend: Backend) {}

  static async load(dir: string, backend: Backend): Promise<Model> {
    const ckpt = await openCheckpoint(dir);
    let spec: ModelSpec;
    try {
      spec = parseModelConfig(ckpt.config, `${dir}/config.json`);
    } catch (e) {
      closeCheckpoint(ckpt);
      throw e;
    }
    const model = new Model(spec, ckpt, backend);
    try {
      prepareCompressedExperts(model); // ces shape checks, or ones when the checkpoint has none
    } catch (e) {
      closeCheckpoint(ckpt);
      throw e;
    }
    return model;
  }

  has(name: string): boolean {
    return this.extra.has(name) || this.ckpt.files.has(name);
  }

  /** The tensor's raw values: the in-memory one if put, else the checkpoint's. */
  async rawTensor(name: string): Promise<RawTensor> {
    return this.extra.get(name) ?? await readTensor(this.ckpt, name);
  }

  /** Put an in-memory tensor under `name` (used instead of the checkpoint's). */
  putTensor(raw: RawTensor): void {
    this.release(raw.name);
    this.extra.set(raw.name, raw);
  }

  private tensorBytes(name: string): number {
    const extra = this.extra.get(name);
    if (extra) return extra.bytes.length;
    const info = this.ckpt.files.get(name)!.tensors.get(name)!;
    return info.end - info.begin;
  }

  async weight(name: string): Promise<Weight> {
    const cached = this.weights.get(name);
    if (cached) return cached;
    this.requireTensor(name);
    const raw = this.extra.get(name) ?? await readTensor(this.ckpt, name);
    let w: Weight;
    if (this.trainable.has(name)) {
      if (!supportsTraining(this.backend)) {
        throw new Error(`backend ${this.backend.name} has no backward ops: cannot train`);
      }
      w = this.backend.uploadTrainableWeight(raw);
    } else {
      w = this.backend.uploadWeight(raw);
    }
    this.weights.set(name, w);
    this.addResident(raw.bytes.length);
    return w;
  }

  /** A checkpoint error naming `name` when neither the checkpoint nor memory has it. */
  private requireTensor(name: string): void {
    if (this.has(name)) return;
    throw new CheckpointError(
      this.ckpt.dir,
      `missing tensor "${name}" required by the ${this.spec.modelType} config`,
    );
  }

  private addResident(bytes: number): void {
    this.residentBytes += bytes;
    this.peakResidentBytes = Math.max(this.peakResidentBytes, this.residentBytes);
  }

  /**
   * Layer l's expert matrices of all `experts` experts stacked for routedExperts (uploaded
   * on first use, like weight()): "gate_up" [E, 2W', H], each expert's gate and up rows
   * interleaved in runs of GATE_UP_RUN (so a matmul tile holds matching gate and up
   * columns: the fused SwiGLU), and "down" [E, H, W']. W' is the expert width W rounded
   * up to whole runs; the padding rows and columns are zero, so they add nothing.
   * "gate" and "up" [E, W', H] each alone are for compressed experts, whose gate and up
   * inputs differ.
   */
  expertStack(l: number, proj: ExpertStackProj, experts: number): Promise<Weight> {
    return this.stacked(
      `${layerPrefix(l)}<experts ${proj} stacked>`,
      proj,
      (part) => Array.from({ length: experts }, (_, e) => expertName(this.spec, l, e, part)),
      [experts],
    );
  }

  /**
   * One SwiGLU MLP (dense, or shared experts) in the same layout, for matmulSwiglu then
   * matmul: "gate_up" [2W', H] and "down" [H, W'].
   */
  mlpStack(names: MlpNames, proj: "gate_up" | "down"): Promise<Weight> {
    return this.stacked(`${names.gate} <mlp ${proj} stacked>`, proj, (part) => [names[part]], []);
  }

  /**
   * Tensors of one dtype and row width concatenated along their rows, uploaded once (like
   * weight()): attention's q, k and v projections (or their biases) as one matrix, so one
   * matmul computes all three.
   */
  async rowStack(key: string, members: string[]): Promise<Weight> {
    const cached = this.stacks.get(key);
    if (cached) return cached.weight;
    members.forEach((name) => this.requireTensor(name));
    const raws: RawTensor[] = [];
    for (const name of members) raws.push(await this.rawTensor(name));
    const [first] = raws;
    for (const raw of raws) {
      if (raw.dtype !== first.dtype || raw.shape.slice(1).join() !== first.shape.slice(1).join()) {
        throw new CheckpointError(
          this.ckpt.dir,
          `tensor "${raw.name}" is ${raw.dtype} [${raw.shape}], unlike "${first.name}" ` +
            `${first.dtype} [${first.shape}]: they cannot be stacked`,
        );
      }
    }
    const checkpointBytes = raws.reduce((n, r) => n + r.bytes.length, 0);
    const dtype = this.heldDtype(first);
    const bytes = new Uint8Array(
      dtype === first.dtype ? checkpointBytes : 4 * raws.reduce((n, r) => n + numelOf(r.shape), 0),
    );
    let at = 0;
    for (const raw of raws) {
      const values = this.heldValues(raw);
      bytes.set(values, at);
      at += values.length;
    }
    const rows = raws.reduce((n, r) => n + r.shape[0], 0);
    const shape = [rows, ...first.shape.slice(1)];
    return this.keepStack(key, members, { name: key, dtype, shape, bytes }, checkpointBytes);
  }

  /** The dtype the backend holds a tensor like `raw` in: f32 on the CPU, else its own. */
  private heldDtype(raw: RawTensor): RawTensor["dtype"] {
    return this.backend.f32Weights ? "F32" : raw.dtype;
  }

  /**
   * raw's values in that dtype, for building a stack: on the CPU the stack is built in f32
   * member by member, where a 16-bit stack would be dropped only after its f32 copy was made.
   */
  private heldValues(raw: RawTensor): Uint8Array {
    const dtype = this.heldDtype(raw);
    return dtype === raw.dtype ? raw.bytes : new Uint8Array(toFloat32(raw).buffer);
  }

  /** Upload a stack and keep it; like every resident weight it counts checkpoint bytes. */
  private keepStack(
    key: string,
    members: string[],
    stack: RawTensor,
    checkpointBytes: number,
  ): Weight {
    const weight = this.backend.uploadWeight(stack);
    this.stacks.set(key, { weight, bytes: checkpointBytes, members });
    this.addResident(checkpointBytes);
    return weight;
  }

  private async stacked(
    key: string,
    proj: ExpertStackProj,
    memberNames: (part: "gate" | "up" | "down") => string[],
    lead: number[],
  ): Promise<Weight> {
    const cached = this.stacks.get(key);
    if (cached) return cached.weight;
    const parts = proj === "gate_up" ? ["gate", "up"] as const : [proj];
    const members = parts.flatMap(memberNames);
    const experts = members.length / parts.length;
    members.forEach((name) => this.requireTensor(name));
    // One expert matrix at a time into the stack (in the dtype the backend holds), so the
    // host holds the stack and one.
    const first = await this.rawTensor(members[0]);
    const { shape } = first;
    const dtype = this.heldDtype(first);
    const checkpointElementBytes = first.bytes.length / (shape[0] * shape[1]);
    const elementBytes = dtype === first.dtype ? checkpointElementBytes : 4;
    const width = proj === "down" ? shape[1] : shape[0];
    const padded = Math.ceil(width / GATE_UP_RUN) * GATE_UP_RUN;
    const hidden = proj === "down" ? shape[0] : shape[1];
    const expertBytes = parts.length * padded * hidden * elementBytes;
    const bytes = new Uint8Array(expertBytes * experts);
    for (const [i, name] of members.entries()) {
      const raw = i === 0 ? first : await this.rawTensor(name);
      if (raw.dtype !== first.dtype || raw.shape.join() !== shape.join()) {
        throw new CheckpointError(
          this.ckpt.dir,
          `expert tensor "${raw.name}" is ${raw.dtype} [${raw.shape}], ` +
            `unlike "${first.name}" ${first.dtype} [${shape}]`,
        );
      }
      const values = this.heldValues(raw);
      const e = i % experts, base = e * expertBytes;
      if (proj === "gate_up") {
        // Run q of gate (part 0) or up (part 1): rows 4q.. to rows 8q + 4 part..
        const part = Math.floor(i / experts), rowBytes = hidden * elementBytes;
        for (let r0 = 0; r0 < width; r0 += GATE_UP_RUN) {
          const run = values.subarray(
            r0 * rowBytes,
            Math.min(r0 + GATE_UP_RUN, width) * rowBytes,
          );
          bytes.set(run, base + (2 * r0 + part * GATE_UP_RUN) * rowBytes);
        }
      } else if (proj !== "down") bytes.set(values, base); // the padding rows last
      else {
        for (let h = 0; h < hidden; h++) {
          const row = values.subarray(h * width * elementBytes, (h + 1) * width * elementBytes);
          bytes.set(row, base + h * padded * elementBytes);
        }
      }
    }
    const stackShape = proj === "down"
      ? [...lead, hidden, padded]
      : [...lead, proj === "gate_up" ? 2 * padded : padded, hidden];
    const checkpointBytes = (bytes.length / elementBytes) * checkpointElementBytes;
    return this.keepStack(
      key,
      members,
      { name: key, dtype, shape: stackShape, bytes },
      checkpointBytes,
    );
  }

  /** The output projection: lm_head, or the embedding when tied. */
  lmHeadName(): string {
    return this.spec.tieEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  }

  /** Free every resident weight whose name starts with `prefix`, and stacks holding one. */
  release(prefix: string): void {
    for (const [key, stack] of this.stacks) {
      if (!key.startsWith(prefix) && !stack.members.some((n) => n.startsWith(prefix))) continue;
      this.residentBytes -= stack.bytes;
      this.backend.freeWeight(stack.weight);
      this.stacks.delete(key);
    }
    for (const [name, w] of this.weights) {
      if (!name.startsWith(prefix)) continue;
      this.residentBytes -= this.tensorBytes(name);
      this.backend.freeWeight(w);
      this.weights.delete(name);
    }
  }

  releaseLayer(l: number): void {
    this.release(layerPrefix(l));
  }

  close(): void {
    this.release("");
    closeCheckpoint(this.ckpt);
  }
}

/** Expected shape of layer l's ces tensor. */
export function cesShape(model: Model, mlp: MoeSpec): [number, number, number] {
  return [mlp.experts, 3, cesWidth(model.spec, mlp)];
}

/**
 * For every compressed-experts layer: check the checkpoint's ces shape, or put a ces of
 * ones in memory when the checkpoint has none (the model then equals plain top-k_m).
 */
export function prepareCompressedExperts(model: Model): void {
  model.spec.layers.forEach((layer, l) => {
    if (layer.mlp.kind !== "moe" || layer.mlp.mainExperts === undefined) return;
    const name = cesName(model.spec, l), want = cesShape(model, layer.mlp);
    const file = model.ckpt.files.get(name);
    if (file) {
      const shape = file.tensors.get(name)!.shape;
      if (shape.join(",") !== want.join(",")) {
        throw new ConfigError(
          `${model.ckpt.dir}: tensor "${name}"`,
          `shape [${shape}] does not match the config's compressed experts [${want}] ` +
            `(experts, 3, max(hidden, expert width))`,
        );
      }
      return;
    }
    if (model.has(name)) return; // already put in memory
    const ones = new Float32Array(want[0] * want[1] * want[2]).fill(1);
    model.putTensor({
      name,
      dtype: "F32",
      shape: want,
      bytes: new Uint8Array(ones.buffer),
    });
  });
}
