// Expert pruning from a results file: read the saliency a profile or search recorded,
// check it belongs to the model, rank each MoE layer's experts by a criterion and write
// the pruned checkpoint. Shared by scripts/prune.ts, scripts/tables.ts and the tests.

import { CpuBackend } from "../backend/cpu.ts";
import { hashModelFolder, readResults, ResultsError } from "../io/results.ts";
import { Model } from "../model/model.ts";
import { UsageError } from "./cli.ts";
import {
  CRITERIA,
  type Criterion,
  type ExpertSaliency,
  type LayerSaliency,
  mostSalient,
  scoresOf,
} from "./expert_saliency.ts";
import { keptCount, type Pruning, routedExperts, writePrunedCheckpoint } from "./prune.ts";
import { PROFILE_KIND, PROFILE_SCHEMA, type RoutingProfile } from "./routing_profile.ts";
import { SEARCH_KIND, SEARCH_SCHEMA } from "./search_job.ts";

export interface SaliencySource {
  path: string;
  model: { path: string; hash: string };
  /** Per MoE layer; from a file written before saliency was recorded, only freq and weight. */
  layers: Record<string, Partial<LayerSaliency> & Pick<LayerSaliency, "freq" | "weight">>;
}

/** The saliency in a routing-profile (`kind` "profile") or search results file. */
export async function readSaliency(
  path: string,
  kind: "profile" | "search",
): Promise<SaliencySource> {
  const res = kind === "profile"
    ? await readResults(path, PROFILE_KIND, PROFILE_SCHEMA)
    : await readResults(path, SEARCH_KIND, SEARCH_SCHEMA);
  const model = res.model as { path?: unknown; hash?: unknown } | undefined;
  if (typeof model?.path !== "string" || typeof model?.hash !== "string") {
    throw new ResultsError(path, `missing "model": {"path", "hash"}`);
  }
  const saliency = res.saliency as ExpertSaliency | undefined;
  const profile = res.profile as RoutingProfile | undefined;
  let layers: SaliencySource["layers"];
  if (saliency?.layers) layers = saliency.layers;
  else if (profile?.layers) {
    // Written before saliency was recorded: the profile's counts and mean weights are
    // the frequency and weight criteria.
    layers = Object.fromEntries(
      Object.entries(profile.layers).map(([l, p]) => [l, { ...p, weight: p.avg_w }]),
    );
  } else throw new ResultsError(path, `has no "saliency" or "profile" section`);
  return { path, model: { path: model.path, hash: model.hash }, layers };
}

/**
 * Check that `modelDir` is the model the saliency was recorded on: the same folder hash,
 * or a condensed checkpoint of it (config "cdmoe.source_hash"), whose MoE layers left are
 * the original's (the combination of condensing and pruning).
 */
export async function checkModel(src: SaliencySource, model: Model, modelDir: string) {
  const hash = await hashModelFolder(modelDir);
  if (hash === src.model.hash) return hash;
  const cdmoe = model.ckpt.config.cdmoe as { source_hash?: unknown } | undefined;
  if (cdmoe?.source_hash === src.model.hash) return hash;
  throw new UsageError(
    `${modelDir}: model differs from the one ${src.path} was recorded on (hash mismatch)`,
  );
}

/** Each MoE layer's `keep` most salient experts under `criterion`. */
export function choosePruning(
  model: Model,
  src: SaliencySource,
  criterion: Criterion,
  keep: number,
  topK: number,
): Pruning {
  if (!CRITERIA.includes(criterion)) {
    throw new UsageError(
      `--criterion: unknown value "${criterion}" (choose one of ${CRITERIA.join(", ")})`,
    );
  }
  const { experts, layers } = routedExperts(model);
  const kept = new Map<number, number[]>();
  for (const l of layers) {
    const s = src.layers[l];
    if (!s || s.freq.length !== experts) {
      throw new UsageError(
        `${src.path}: no saliency for MoE layer ${l} with ${experts} experts ` +
          `(recorded on another model?)`,
      );
    }
    if (scoresOf(s as LayerSaliency, criterion) === undefined) {
      throw new UsageError(
        `${src.path}: has no "${criterion}" saliency (written before it was recorded); ` +
          `run deno task profile again`,
      );
    }
    kept.set(l, mostSalient(scoresOf(s as LayerSaliency, criterion), keep));
  }
  return { kept, topK };
}

export interface PruneRequest {
  /** --search FILE or --profile FILE. */
  source: { kind: "profile" | "search"; path: string };
  /** Model folder (default: the one recorded in the file). */
  model?: string;
  criterion: Criterion;
  keep?: number;
  ratio?: number;
  topK?: number;
}

export async function pruneFromFile(req: PruneRequest, outDir: string) {
  const src = await readSaliency(req.source.path, req.source.kind);
  const modelDir = req.model ?? src.model.path;
  const model = await Model.load(modelDir, new CpuBackend());
  try {
    const hash = await checkModel(src, model, modelDir);
    const { keep, topK } = keptCount(model, req);
    const pruning = choosePruning(model, src, req.criterion, keep, topK);
    const provenance = {
      source: modelDir,
      source_hash: hash,
      saliency_file: req.source.path,
      criterion: req.criterion,
    };
    const sizes = await writePrunedCheckpoint(model, pruning, outDir, provenance);
    return { ...sizes, pruning, experts: routedExperts(model).experts, provenance };
  } finally {
    model.close();
  }
}
