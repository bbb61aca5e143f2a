// Expert pruning (docs/expert-pruning.md): every MoE layer keeps the same number of its
// routed experts, renumbered 0..K-1 in their original order, and its router keeps the
// matching rows; shared experts (and Qwen's shared-expert gate) stay. The result is a
// checkpoint of the same architecture whose config only says fewer experts (and, if
// asked, a smaller top-k), so any loader reads it as an ordinary smaller model.

import type { RawTensor } from "../io/safetensors.ts";
import {
  CheckpointError,
  readTensor,
  tensorInfo,
  writeCheckpointFolder,
  writeTextNamed,
} from "../io/checkpoint.ts";
import {
  ConfigError,
  expertName,
  layerPrefix,
  type ModelSpec,
  moeLayers,
  parseModelConfig,
  routerName,
} from "../model/config.ts";
import type { Model } from "../model/model.ts";
import { UsageError } from "../cli.ts";
import { lazyPlanned, type PlannedTensor, planSize, weightBytes } from "./condense.ts";
import { moeSpec } from "./plan.ts";

export interface Pruning {
  /** Kept routed experts of each MoE layer, ascending source ids, all of one length. */
  kept: Map<number, number[]>;
  /** Experts per token in the pruned model. */
  topK: number;
}

/** What config.json records about a pruning under "expert_pruning" (ignored by loaders). */
export interface PruneProvenance {
  source: string;
  source_hash: string;
  saliency_file: string;
  criterion: string;
}

// Config keys that hold the number of routed experts, across the architectures (DeepSeek,
// Qwen-MoE and OLMoE, Mixtral). The pruned config sets whichever one the model reads.
const EXPERT_COUNT_KEYS = ["n_routed_experts", "num_experts", "num_local_experts"];
const TOP_K_KEY = "num_experts_per_tok";

/** Routed experts per MoE layer of `model` (the same in every layer), and its top-k. */
export function routedExperts(model: Model): { experts: number; topK: number; layers: number[] } {
  const layers = moeLayers(model.spec);
  if (layers.length === 0) {
    throw new UsageError(`${model.ckpt.dir}/config.json: the model has no MoE layers to prune`);
  }
  const first = moeSpec(model, layers[0]);
  for (const l of layers) {
    const mlp = moeSpec(model, l);
    if (mlp.experts !== first.experts || mlp.topK !== first.topK) {
      throw new UsageError(
        `${model.ckpt.dir}/config.json: MoE layers differ in experts or top-k; cannot prune ` +
          `the same number from each`,
      );
    }
    if (mlp.mainExperts !== undefined) {
      throw new UsageError(
        `${model.ckpt.dir}: pruning a compressed-experts checkpoint is not supported`,
      );
    }
  }
  return { experts: first.experts, topK: first.topK, layers };
}

/**
 * Experts kept per layer from --keep N or --ratio R (R = the fraction of routed experts
 * removed, rounded down to whole experts as REAP does), checked against the top-k the
 * pruned model will route: at least one expert goes, and at least top-k stay.
 */
export function keptCount(
  model: Model,
  opts: { keep?: number; ratio?: number; topK?: number },
): { keep: number; topK: number } {
  const { experts, topK: modelTopK } = routedExperts(model);
  let keep: number;
  if (opts.keep !== undefined) {
    if (opts.ratio !== undefined) throw new UsageError("give --keep or --ratio, not both");
    keep = opts.keep;
  } else if (opts.ratio !== undefined) {
    if (!(opts.ratio > 0 && opts.ratio < 1)) {
      throw new UsageError(
        `--ratio ${opts.ratio}: expected a fraction in (0, 1) of experts to remove`,
      );
    }
    keep = experts - Math.floor(opts.ratio * experts);
  } else throw new UsageError("--keep or --ratio is required (see --help)");
  const what = opts.keep !== undefined ? `--keep ${keep}` : `--ratio ${opts.ratio} keeps ${keep}`;
  if (!Number.isSafeInteger(keep) || keep < 1 || keep >= experts) {
    throw new UsageError(
      `${what}: the model has ${experts} routed experts per layer; keep between 1 and ${
        experts - 1
      }`,
    );
  }
  const topK = opts.topK ?? modelTopK;
  if (!Number.isSafeInteger(topK) || topK < 1) {
    throw new UsageError(`--top-k ${topK}: expected an integer >= 1`);
  }
  if (topK > keep) {
    throw new UsageError(
      `${what} experts per layer, fewer than the ${topK} each token routes to ` +
        `(${opts.topK === undefined ? "the model's top-k; lower it with --top-k" : "--top-k"})`,
    );
  }
  return { keep, topK };
}

/**
 * The source config.json with the expert count (and top-k) changed, plus provenance.
 * The key is found by parsing, not by a table per model type: the one among
 * EXPERT_COUNT_KEYS that gives every MoE layer `keep` experts and changes nothing else.
 */
export function prunedConfig(
  model: Model,
  pruning: Pruning,
  provenance: PruneProvenance,
): Record<string, unknown> {
  const path = `${model.ckpt.dir}/config.json`;
  const raw = model.ckpt.config, { topK } = routedExperts(model);
  const keep = [...pruning.kept.values()][0].length;
  const record = {
    ...provenance,
    experts_before: routedExperts(model).experts,
    top_k_before: topK,
    kept: Object.fromEntries(pruning.kept),
  };
  for (const key of EXPERT_COUNT_KEYS) {
    const cfg: Record<string, unknown> = { ...raw, [key]: keep };
    if (pruning.topK !== topK) cfg[TOP_K_KEY] = pruning.topK;
    let spec: ModelSpec;
    try {
      spec = parseModelConfig(cfg, path);
    } catch {
      continue;
    }
    if (sameExceptExperts(model.spec, spec, keep, pruning.topK)) {
      // An older pruning's record is replaced: "kept" names the source's experts.
      return { ...cfg, expert_pruning: record };
    }
  }
  throw new ConfigError(
    path,
    `found no config key (${EXPERT_COUNT_KEYS.join(", ")}) that sets the number of routed experts`,
  );
}

function sameExceptExperts(a: ModelSpec, b: ModelSpec, experts: number, topK: number): boolean {
  if (a.layers.length !== b.layers.length) return false;
  return a.layers.every((la, l) => {
    const lb = b.layers[l];
    if (la.mlp.kind !== "moe") return JSON.stringify(la) === JSON.stringify(lb);
    if (lb.mlp.kind !== "moe") return false;
    const expected = { ...la, mlp: { ...la.mlp, experts, topK, renorm: lb.mlp.renorm } };
    return lb.mlp.experts === experts && lb.mlp.topK === topK &&
      JSON.stringify(expected) === JSON.stringify(lb);
  });
}

/** The pruned checkpoint's tensors, in the source's order, kept experts renamed. */
export function prunedTensors(model: Model, pruning: Pruning): PlannedTensor[] {
  const s = model.spec;
  // name in the source -> what becomes of it (dropped: absent from `to`)
  const to = new Map<string, PlannedTensor>();
  const handled = new Set<string>();
  for (const [l, kept] of pruning.kept) {
    const mlp = moeSpec(model, l);
    for (let e = 0; e < mlp.experts; e++) {
      for (const p of ["gate", "up", "down"] as const) handled.add(expertName(s, l, e, p));
    }
    kept.forEach((e, i) => {
      for (const p of ["gate", "up", "down"] as const) {
        const from = expertName(s, l, e, p), info = tensorInfo(model.ckpt, from);
        if (!info) throw new CheckpointError(model.ckpt.dir, `missing tensor "${from}"`);
        const name = expertName(s, l, i, p);
        to.set(from, {
          name,
          dtype: info.dtype,
          shape: info.shape,
          build: async () => ({ ...await readTensor(model.ckpt, from), name }),
        });
      }
    });
    const router = routerName(s, l), info = tensorInfo(model.ckpt, router);
    if (!info) throw new CheckpointError(model.ckpt.dir, `missing tensor "${router}"`);
    handled.add(router);
    to.set(router, {
      name: router,
      dtype: info.dtype,
      shape: [kept.length, ...info.shape.slice(1)],
      build: async () => sliceRows(await readTensor(model.ckpt, router), kept),
    });
  }
  const out: PlannedTensor[] = [];
  const { experts } = routedExperts(model);
  const moePrefixes = [...pruning.kept.keys()].map((l) => `${layerPrefix(l)}${s.names.moeBlock}.`);
  for (const name of model.ckpt.files.keys()) {
    if (handled.has(name)) {
      if (to.has(name)) out.push(to.get(name)!);
      continue;
    }
    // Anything else in the block that is per expert would be left the wrong size.
    const info = tensorInfo(model.ckpt, name)!;
    if (moePrefixes.some((p) => name.startsWith(p)) && info.shape[0] === experts) {
      const shared = s.names.shared && name.includes(`.${s.names.shared}.`);
      if (!shared && !name.endsWith("shared_expert_gate.weight")) {
        throw new CheckpointError(
          model.ckpt.dir,
          `tensor "${name}" [${info.shape}] looks per-expert; pruning does not know how to slice it`,
        );
      }
    }
    out.push({ name, dtype: info.dtype, shape: info.shape });
  }
  return out;
}

/** Rows `rows` of a 2-D (or higher) tensor, in that order, bytes copied as they are. */
function sliceRows(raw: RawTensor, rows: number[]): RawTensor {
  const rowBytes = raw.bytes.length / raw.shape[0];
  const bytes = new Uint8Array(rows.length * rowBytes);
  rows.forEach((r, i) =>
    bytes.set(raw.bytes.subarray(r * rowBytes, (r + 1) * rowBytes), i * rowBytes)
  );
  return { ...raw, shape: [rows.length, ...raw.shape.slice(1)], bytes };
}

async function sizeOf(path: string): Promise<number> {
  return (await Deno.stat(path)).size;
}

/**
 * Write the pruned checkpoint to `outDir` (which must not exist), through the checkpoint
 * writer condensing uses: a temp folder renamed at the end, so a failure leaves nothing.
 */
export async function writePrunedCheckpoint(
  model: Model,
  pruning: Pruning,
  outDir: string,
  provenance: PruneProvenance,
): Promise<{ bytesBefore: number; bytesAfter: number; params: number; tensors: number }> {
  try {
    await Deno.stat(outDir);
    throw new UsageError(`${outDir}: output folder already exists (choose another --out)`);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  // Everything that can fail on bad input fails here, before anything is written.
  const config = prunedConfig(model, pruning, provenance);
  const planned = prunedTensors(model, pruning);
  let bytesBefore = 0;
  for (const shard of model.ckpt.shards) bytesBefore += await sizeOf(shard.path);
  // One tensor at a time, sharded like the source (condense.ts's writer).
  let files: string[] = [];
  await writeCheckpointFolder(model.ckpt, outDir, async (tmp, weights) => {
    files = await weights(lazyPlanned(model, planned));
    await writeTextNamed(`${tmp}/config.json`, JSON.stringify(config, null, 2) + "\n");
  });
  const bytesAfter = await weightBytes(outDir, files);
  return { bytesBefore, bytesAfter, params: planSize(planned).params, tensors: planned.length };
}
