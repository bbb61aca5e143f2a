// Build a compression plan from a search results file and write the condensed
// checkpoint; shared by scripts/condense.ts and the tests.

import { CpuBackend } from "../backend/cpu.ts";
import { hashModelFolder, readResults } from "../io/results.ts";
import { Model } from "../model/model.ts";
import { UsageError } from "./cli.ts";
import { type Provenance, writeCondensedCheckpoint } from "./condense.ts";
import { planOf, type Variant, VARIANTS } from "./layer_search.ts";
import type { LayerChange, Plan } from "./plan.ts";
import { SEARCH_KIND, SEARCH_SCHEMA } from "./search_job.ts";

export interface CondenseRequest {
  search: string;
  /** Model folder (default: the one recorded in the search results). */
  model?: string;
  variant: Variant;
  /** How many layers of the variant's order to change. */
  layers: number;
  /** Experts kept per layer for sr (default: the search's k). */
  experts?: number;
  /** Largest output shard (default 5 GB, as Hugging Face writes them). */
  maxShardBytes?: number;
}

/** Read a search results file and turn (variant, N layers, k experts) into a plan. */
export async function planFromSearch(req: CondenseRequest) {
  const res = await readResults(req.search, SEARCH_KIND, SEARCH_SCHEMA);
  const settings = res.settings as { experts: number };
  const modelInfo = res.model as { path: string; hash: string };
  const variants = res.layer_search as Record<string, { order: number[] }>;
  const v = variants[req.variant];
  if (!VARIANTS.includes(req.variant) || !v) {
    throw new UsageError(
      `--variant ${req.variant}: ${req.search} has layer orders for ${
        Object.keys(variants).join(", ") || "no variant"
      }`,
    );
  }
  if (req.layers < 1 || req.layers > v.order.length) {
    throw new UsageError(
      `--layers ${req.layers}: ${req.search} has ${v.order.length} steps for ${req.variant}`,
    );
  }
  const k = req.experts ?? settings.experts;
  const experts = res.expert_search as Record<string, { order: number[]; wbar: number[] }>;
  const change = (l: number): LayerChange => {
    if (req.variant === "layerdrop" || req.variant === "blockdrop") return { kind: req.variant };
    if (req.variant === "s" || k === 0) return { kind: "condense", experts: [], wbar: [] };
    const e = experts[l];
    if (!e || e.order.length < k) {
      throw new UsageError(
        `--experts ${k}: ${req.search} has ${e?.order.length ?? 0} greedy experts for layer ${l}`,
      );
    }
    return { kind: "condense", experts: e.order.slice(0, k), wbar: e.wbar.slice(0, k) };
  };
  const plan: Plan = planOf(v.order.slice(0, req.layers), change);
  return { plan, modelPath: req.model ?? modelInfo.path, modelHash: modelInfo.hash, k };
}

export async function condenseFromSearch(req: CondenseRequest, outDir: string) {
  const { plan, modelPath, modelHash, k } = await planFromSearch(req);
  const hash = await hashModelFolder(modelPath);
  if (hash !== modelHash) {
    throw new UsageError(
      `${modelPath}: model differs from the one ${req.search} was searched on (hash mismatch)`,
    );
  }
  const model = await Model.load(modelPath, new CpuBackend());
  try {
    const provenance: Provenance = {
      source: modelPath,
      source_hash: hash,
      search: req.search,
      variant: req.variant,
      num_changed: plan.size,
      note: model.spec.modelType === "qwen2_moe" && req.variant !== "layerdrop" &&
          req.variant !== "blockdrop"
        ? "Qwen2-MoE: condensed layers keep the sigmoid-gated shared expert (gated_shared_size)"
        : undefined,
    };
    const sizes = await writeCondensedCheckpoint(model, plan, outDir, provenance, {
      maxShardBytes: req.maxShardBytes,
    });
    return { ...sizes, plan, k, provenance };
  } finally {
    model.close();
  }
}
