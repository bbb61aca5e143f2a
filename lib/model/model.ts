// A loaded model: its spec, its checkpoint (opened lazily) and the weights resident on
// a backend. Weights are uploaded on first use; the layer-wise mode releases each
// layer's weights after use so only one layer is resident at a time.

import { type Backend, supportsTraining, type Weight } from "../backend/backend.ts";
import {
  type Checkpoint,
  CheckpointError,
  closeCheckpoint,
  openCheckpoint,
  readTensor,
} from "../io/checkpoint.ts";
import type { RawTensor } from "../io/safetensors.ts";
import { prepareCompressedExperts } from "../methods/compressed_experts.ts";
import { expertName, layerPrefix, type ModelSpec, parseModelConfig } from "./config.ts";

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
   * Layer l's `proj` matrices of all `experts` experts stacked into one weight
   * [experts, M, K] (uploaded on first use, like weight()), for groupedMatmul.
   */
  async expertStack(l: number, proj: "gate" | "up" | "down", experts: number): Promise<Weight> {
    const key = `${layerPrefix(l)}<experts ${proj} stacked>`;
    const cached = this.stacks.get(key);
    if (cached) return cached.weight;
    const members = Array.from({ length: experts }, (_, e) => expertName(this.spec, l, e, proj));
    members.forEach((name) => this.requireTensor(name));
    // One expert at a time into the stack, so the host holds the stack and one expert.
    const first = await this.rawTensor(members[0]);
    const { dtype, shape } = first, size = first.bytes.length;
    const bytes = new Uint8Array(size * experts);
    for (let e = 0; e < experts; e++) {
      const raw = e === 0 ? first : await this.rawTensor(members[e]);
      if (raw.dtype !== dtype || raw.shape.join() !== shape.join()) {
        throw new CheckpointError(
          this.ckpt.dir,
          `expert tensor "${raw.name}" is ${raw.dtype} [${raw.shape}], ` +
            `unlike "${first.name}" ${dtype} [${shape}]`,
        );
      }
      bytes.set(raw.bytes, e * size);
    }
    const weight = this.backend.uploadWeight({
      name: key,
      dtype,
      shape: [experts, ...shape],
      bytes,
    });
    this.stacks.set(key, { weight, bytes: bytes.length, members });
    this.addResident(bytes.length);
    return weight;
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
