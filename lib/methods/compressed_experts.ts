// Compressed Experts (He et al. 2025, arXiv 2503.00634), the method's side: enabling them
// on a model with k_m main experts, the names of the ces tensors and the config.json
// section a fine-tuned model records. What the forward computes, and the formulas:
// lib/model/compressed_experts.ts.

import { cesName, enableCompressedExperts, type MoeSpec } from "../model/config.ts";
import { type Model, prepareCompressedExperts } from "../model/model.ts";

/**
 * Enable compressed experts with k_m main experts on every MoE layer (a CLI flag; `flag`
 * names it in errors), then load or initialise the ces tensors.
 */
export function enableOnModel(model: Model, mainExperts: number, flag: string): void {
  enableCompressedExperts(model.spec.layers, mainExperts, flag, model.spec.modelType);
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

/** The config.json section recording k_m, or null when compressed experts are off. */
export function compressedExpertsConfig(model: Model): { main_experts: number } | null {
  const layer = model.spec.layers.find((l) => l.mlp.kind === "moe" && l.mlp.mainExperts);
  return layer ? { main_experts: (layer.mlp as MoeSpec).mainExperts! } : null;
}
