// Turn a compression plan into real tensors: each condensed layer becomes one dense
// SwiGLU MLP (shared experts + kept experts, gate/up rows stacked, each kept expert's
// down-projection columns scaled by its fixed weight wbar), its router and other experts
// are gone; dropped layers/blocks lose their tensors. The same tensor list serves the
// size report, the checkpoint writer and the in-memory condensed model.

import type { DType, LazyTensor, RawTensor } from "../io/safetensors.ts";
import { DTYPE_BYTES, f32ToBf16Bits, numel, toFloat32 } from "../io/safetensors.ts";
import {
  readTensor,
  tensorInfo,
  type WeightsLayout,
  writeCheckpointFolder,
  writeTextNamed,
} from "../io/checkpoint.ts";
import {
  CDMOE_SUFFIX,
  denseName,
  expertName,
  layerPrefix,
  parseModelConfig,
  routerName,
  sharedGateName,
  sharedName,
} from "../model/config.ts";
import { Model } from "../model/model.ts";
import { UsageError } from "../cli.ts";
import { type LayerChange, moeSpec, type Plan } from "./plan.ts";

/** One tensor of the compressed checkpoint: kept from the source, or built. */
export interface PlannedTensor {
  name: string;
  dtype: DType;
  shape: number[];
  build?: () => Promise<RawTensor>;
}

const PROJS = ["gate", "up", "down"] as const;

/** Names of the tensors a change removes from layer l. */
function removedNames(model: Model, l: number, change: LayerChange): Set<string> {
  const s = model.spec, out = new Set<string>();
  if (change.kind === "blockdrop") {
    for (const name of model.ckpt.files.keys()) if (name.startsWith(layerPrefix(l))) out.add(name);
    return out;
  }
  const mlp = moeSpec(model, l);
  out.add(routerName(s, l));
  for (let e = 0; e < mlp.experts; e++) for (const p of PROJS) out.add(expertName(s, l, e, p));
  const foldShared = mlp.sharedWidth > 0 && !mlp.sharedGate;
  if (change.kind === "layerdrop" || foldShared) {
    for (const p of PROJS) if (mlp.sharedWidth > 0) out.add(sharedName(s, l, p));
  }
  if (change.kind === "layerdrop" && mlp.sharedGate) out.add(sharedGateName(l));
  // No MLP left (LayerDrop; CD-MoE-S without a shared expert): nothing reads its norm.
  const noMlp = change.kind === "layerdrop" ||
    (!mlp.sharedGate && condensedWidth(model, l, change.experts.length) === 0);
  if (noMlp) out.add(`${layerPrefix(l)}post_attention_layernorm.weight`);
  return out;
}

/** Width of the dense MLP a condensed layer becomes (Qwen: the gated shared expert stays apart). */
export function condensedWidth(model: Model, l: number, keptExperts: number): number {
  const mlp = moeSpec(model, l);
  return (mlp.sharedGate ? 0 : mlp.sharedWidth) + keptExperts * mlp.expertWidth;
}

/** The tensor list of the model after `plan`, in source dtypes. */
export function planTensors(model: Model, plan: Plan): PlannedTensor[] {
  const removed = new Set<string>();
  const built: PlannedTensor[] = [];
  for (const [l, change] of plan) {
    for (const name of removedNames(model, l, change)) removed.add(name);
    if (change.kind !== "condense") continue;
    const dtype = tensorInfo(model.ckpt, expertName(model.spec, l, 0, "gate"))!.dtype;
    const W = condensedWidth(model, l, change.experts.length), H = model.spec.hidden;
    if (W === 0) continue; // nothing routed kept and no foldable shared expert
    // The three are built together and kept until each was taken once, so a writer
    // holds one condensed layer at a time.
    let dense: Promise<Record<"gate" | "up" | "down", RawTensor>> | null = null, taken = 0;
    for (const p of PROJS) {
      built.push({
        name: denseName(l, p),
        dtype,
        shape: p === "down" ? [H, W] : [W, H],
        build: async () => {
          const tensors = await (dense ??= condenseLayerTensors(model, l, change, dtype));
          if (++taken % PROJS.length === 0) dense = null;
          return tensors[p];
        },
      });
    }
  }
  const kept: PlannedTensor[] = [];
  for (const name of model.ckpt.files.keys()) {
    if (removed.has(name)) continue;
    const info = tensorInfo(model.ckpt, name)!;
    kept.push({ name, dtype: info.dtype, shape: info.shape });
  }
  // Layer by layer (embeddings first, the final norm and head last), as save_pretrained
  // orders them, so a layer's tensors share a shard.
  const rank = (name: string) => {
    const m = /^model\.layers\.(\d+)\./.exec(name);
    return m ? Number(m[1]) : name.startsWith("model.embed_tokens") ? -1 : Infinity;
  };
  return [...kept, ...built].sort((a, b) =>
    rank(a.name) - rank(b.name) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)
  );
}

/** Parameters and bytes of a planned tensor list. */
export function planSize(tensors: PlannedTensor[]): { params: number; bytes: number } {
  let params = 0, bytes = 0;
  for (const t of tensors) {
    params += numel(t.shape);
    bytes += numel(t.shape) * DTYPE_BYTES[t.dtype];
  }
  return { params, bytes };
}

/** The dense gate/up/down of one condensed layer, rounded once to `dtype` (fold-in of wbar). */
export async function condenseLayerTensors(
  model: Model,
  l: number,
  change: Extract<LayerChange, { kind: "condense" }>,
  dtype: DType,
): Promise<Record<"gate" | "up" | "down", RawTensor>> {
  const s = model.spec, mlp = moeSpec(model, l), H = s.hidden;
  // Blocks in order: [shared (unless gated)] + kept experts, with their down scales.
  const blocks: { names: Record<string, string>; scale: number; width: number }[] = [];
  if (mlp.sharedWidth > 0 && !mlp.sharedGate) {
    const names = Object.fromEntries(PROJS.map((p) => [p, sharedName(s, l, p)]));
    blocks.push({ names, scale: 1, width: mlp.sharedWidth });
  }
  change.experts.forEach((e, i) => {
    const names = Object.fromEntries(PROJS.map((p) => [p, expertName(s, l, e, p)]));
    blocks.push({ names, scale: change.wbar[i], width: mlp.expertWidth });
  });
  const W = blocks.reduce((a, b) => a + b.width, 0);
  const gate = new Float32Array(W * H),
    up = new Float32Array(W * H),
    down = new Float32Array(H * W);
  let row = 0;
  for (const b of blocks) {
    gate.set(toFloat32(await readTensor(model.ckpt, b.names.gate)), row * H);
    up.set(toFloat32(await readTensor(model.ckpt, b.names.up)), row * H);
    const d = toFloat32(await readTensor(model.ckpt, b.names.down)); // [H, width]
    for (let h = 0; h < H; h++) {
      for (let j = 0; j < b.width; j++) down[h * W + row + j] = b.scale * d[h * b.width + j];
    }
    row += b.width;
  }
  return {
    gate: encode(denseName(l, "gate"), [W, H], gate, dtype),
    up: encode(denseName(l, "up"), [W, H], up, dtype),
    down: encode(denseName(l, "down"), [H, W], down, dtype),
  };
}

/** f32 values -> a tensor in the source dtype (bf16/f16 round to nearest even). */
function encode(name: string, shape: number[], data: Float32Array, dtype: DType): RawTensor {
  let bytes: Uint8Array;
  if (dtype === "F32") bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  else if (dtype === "BF16") bytes = new Uint8Array(f32ToBf16Bits(data).buffer);
  else if (dtype === "F16") bytes = new Uint8Array(Float16Array.from(data).buffer);
  else throw new Error(`${name}: cannot write dtype ${dtype}`);
  return { name, dtype, shape, bytes };
}

/** What config.json records about a compression (provenance + per-layer changes). */
export interface Provenance {
  source: string;
  source_hash: string;
  search: string | null;
  variant: string;
  num_changed: number;
  note?: string;
}

/**
 * The source config.json with model_type "<original>_cdmoe", architectures renamed alike
 * and no auto_map (so that transformers and vLLM refuse the folder: they would build the
 * full MoE, initialise the missing routers and experts at random with only a warning and
 * ignore the dense MLPs), plus a "cdmoe" section parseModelConfig understands, holding the
 * original model_type, architectures and auto_map. Layout: docs/cd-moe.md.
 */
export function condensedConfig(model: Model, plan: Plan, provenance: Provenance) {
  const { auto_map: _autoMap, ...source } = model.ckpt.config;
  // A source condensed before keeps its original and its changed layers.
  const prior = source.cdmoe as
    | { original?: Record<string, unknown>; layers?: Record<string, unknown> }
    | undefined;
  const original = prior?.original ?? Object.fromEntries(
    ["model_type", "architectures", "auto_map"]
      .filter((k) => model.ckpt.config[k] !== undefined)
      .map((k) => [k, model.ckpt.config[k]]),
  );
  const architectures = original.architectures as string[] | undefined;
  const layers: Record<string, unknown> = { ...prior?.layers };
  for (const [l, change] of [...plan].sort((a, b) => a[0] - b[0])) {
    if (change.kind !== "condense") {
      layers[l] = { change: change.kind };
      continue;
    }
    const mlp = moeSpec(model, l);
    layers[l] = {
      change: "condense",
      intermediate_size: condensedWidth(model, l, change.experts.length),
      ...(mlp.sharedGate ? { gated_shared_size: mlp.sharedWidth } : {}),
      shared_width: mlp.sharedWidth,
      experts: change.experts,
      wbar: change.wbar,
    };
  }
  return {
    ...source,
    model_type: `${original.model_type}${CDMOE_SUFFIX}`,
    ...(architectures
      ? {
        architectures: architectures.map((a) => `${a.replace(/ForCausalLM$/, "")}CdmoeForCausalLM`),
      }
      : {}),
    cdmoe: {
      format: CDMOE_FORMAT,
      about: "CD-MoE checkpoint written by moe-condense (scripts/condense.ts): the layers under " +
        "cdmoe.layers are dense SwiGLU MLPs or dropped; the layout is in docs/cd-moe.md",
      original,
      ...provenance,
      layers,
    },
  };
}

/** Version of the condensed layout described in docs/cd-moe.md. */
export const CDMOE_FORMAT = 1;

/** The condensed model in memory, sharing the source checkpoint for unchanged tensors. */
export async function condenseInMemory(model: Model, plan: Plan, provenance: Provenance) {
  const config = condensedConfig(model, plan, provenance);
  const spec = parseModelConfig(config, `${model.ckpt.dir}/config.json (condensed in memory)`);
  const out = new Model(spec, model.ckpt, model.backend);
  for (const t of planTensors(model, plan)) if (t.build) out.putTensor(await t.build());
  return out;
}

async function sizeOf(path: string): Promise<number> {
  return (await Deno.stat(path)).size;
}

/**
 * Write the compressed checkpoint to `outDir` (which must not exist): built in a temp
 * folder beside it and renamed at the end, so a failure leaves no partial output. Weights
 * are written one tensor at a time, sharded like the source (and whenever they pass
 * `layout.maxShardBytes`, 5 GB by default). Returns real file bytes of the weights before
 * and after.
 */
export async function writeCondensedCheckpoint(
  model: Model,
  plan: Plan,
  outDir: string,
  provenance: Provenance,
  layout: WeightsLayout = {},
): Promise<{ bytesBefore: number; bytesAfter: number; params: number; tensors: number }> {
  try {
    await Deno.stat(outDir);
    throw new UsageError(`${outDir}: output folder already exists (choose another --out)`);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  let bytesBefore = 0;
  for (const shard of model.ckpt.shards) bytesBefore += await sizeOf(shard.path);
  const planned = planTensors(model, plan);
  let files: string[] = [];
  await writeCheckpointFolder(model.ckpt, outDir, async (tmp, weights) => {
    files = await weights(lazyPlanned(model, planned));
    await writeTextNamed(
      `${tmp}/config.json`,
      JSON.stringify(condensedConfig(model, plan, provenance), null, 2) + "\n",
    );
  }, layout);
  const bytesAfter = await weightBytes(outDir, files);
  return { bytesBefore, bytesAfter, params: planSize(planned).params, tensors: planned.length };
}

/** Planned tensors as the writers take them: each built or read when its turn comes. */
export function lazyPlanned(model: Model, planned: PlannedTensor[]): LazyTensor[] {
  return planned.map((t) => ({
    name: t.name,
    dtype: t.dtype,
    shape: t.shape,
    bytes: async () => (t.build ? await t.build() : await readTensor(model.ckpt, t.name)).bytes,
  }));
}

/** Bytes of the weight files among `files` (as a WeightsWriter returns them) in `dir`. */
export async function weightBytes(dir: string, files: string[]): Promise<number> {
  let bytes = 0;
  for (const f of files) if (f.endsWith(".safetensors")) bytes += await sizeOf(`${dir}/${f}`);
  return bytes;
}
