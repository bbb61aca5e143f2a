// Compressed Experts (He et al. 2025, arXiv 2503.00634), the method's side: enabling them
// on a model with k_m main experts, the names of the ces tensors and the config.json
// section a fine-tuned model records. What the forward computes, and the formulas:
// lib/model/compressed_experts.ts.

import {
  cesName,
  enableCompressedExperts,
  type MoeSpec,
  type RenormOver,
} from "../model/config.ts";
import { type Model, prepareCompressedExperts } from "../model/model.ts";

/**
 * Enable compressed experts with k_m main experts on every MoE layer (a CLI flag; `flag`
 * names it in errors), then load or initialise the ces tensors. `renormOver`: see
 * MlpSpec.renormOver (default the release's "top_k").
 */
export function enableOnModel(
  model: Model,
  mainExperts: number,
  flag: string,
  renormOver: RenormOver = "top_k",
): void {
  const s = model.spec;
  enableCompressedExperts(s.layers, mainExperts, flag, s.modelType, renormOver);
  prepareCompressedExperts(model);
}

/** Names of the ces tensors of the compressed-experts layers (checkpoint or in memory). */
export function cesNames(model: Model): string[] {
  const out: string[] = [];
  model.spec.layers.forEach((layer, l) => {
    if (layer.mlp.kind === "moe" && layer.mlp.mainExperts !== undefined) {
      out.push(cesName(model.spec, l));
    }
  });
  return out;
}

/** The config.json section recording k_m and renorm_over, or null when compressed experts are off. */
export function compressedExpertsConfig(
  model: Model,
): { main_experts: number; renorm_over: RenormOver } | null {
  const layer = model.spec.layers.find((l) => l.mlp.kind === "moe" && l.mlp.mainExperts);
  if (!layer) return null;
  const mlp = layer.mlp as MoeSpec;
  return { main_experts: mlp.mainExperts!, renorm_over: mlp.renormOver ?? "top_k" };
}
