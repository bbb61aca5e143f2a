// Active parameters with compressed experts reproduce the paper's OLMoE-1B-7B figure
// (He et al. 2025: 1.28B -> 0.878B, -31.4%) from the config alone.

import assert from "node:assert";
import type { Backend } from "../lib/backend/backend.ts";
import type { Checkpoint } from "../lib/io/checkpoint.ts";
import type { SafetensorsFile } from "../lib/io/safetensors.ts";
import { type ModelSpec, parseModelConfig } from "../lib/model/config.ts";
import { Model } from "../lib/model/model.ts";
import { countParams } from "../lib/eval/measure.ts";

/** A Model whose checkpoint lists OLMoE's tensor shapes (no data: countParams reads shapes). */
function shapesOnly(spec: ModelSpec): Model {
  const H = spec.hidden, shapes = new Map<string, number[]>();
  shapes.set("model.embed_tokens.weight", [spec.vocab, H]);
  shapes.set("lm_head.weight", [spec.vocab, H]);
  shapes.set("model.norm.weight", [H]);
  for (const layer of spec.layers) {
    const p = `model.layers.${layer.index}.`, mlp = layer.mlp;
    if (mlp.kind !== "moe") throw new Error("OLMoE layers are all MoE");
    for (const n of ["q", "k", "v", "o"]) shapes.set(`${p}self_attn.${n}_proj.weight`, [H, H]);
    shapes.set(`${p}self_attn.q_norm.weight`, [H]);
    shapes.set(`${p}self_attn.k_norm.weight`, [H]);
    shapes.set(`${p}input_layernorm.weight`, [H]);
    shapes.set(`${p}post_attention_layernorm.weight`, [H]);
    shapes.set(`${p}mlp.gate.weight`, [mlp.experts, H]);
    for (let e = 0; e < mlp.experts; e++) {
      shapes.set(`${p}mlp.experts.${e}.gate_proj.weight`, [mlp.expertWidth, H]);
      shapes.set(`${p}mlp.experts.${e}.up_proj.weight`, [mlp.expertWidth, H]);
      shapes.set(`${p}mlp.experts.${e}.down_proj.weight`, [H, mlp.expertWidth]);
    }
  }
  const files = new Map<string, SafetensorsFile>();
  for (const [name, shape] of shapes) {
    files.set(name, { tensors: new Map([[name, { shape }]]) } as unknown as SafetensorsFile);
  }
  const ckpt = { dir: "olmoe-1b-7b", config: {}, files, shards: [] } as Checkpoint;
  return new Model(spec, ckpt, {} as Backend);
}

const OLMOE_1B_7B = {
  model_type: "olmoe",
  hidden_size: 2048,
  intermediate_size: 1024,
  num_hidden_layers: 16,
  num_attention_heads: 16,
  num_experts: 64,
  num_experts_per_tok: 8,
  vocab_size: 50304,
  tie_word_embeddings: false,
};

Deno.test("ce: active parameters reproduce the paper's OLMoE-1B-7B figure", () => {
  const full = countParams(shapesOnly(parseModelConfig(OLMOE_1B_7B)));
  const ce = countParams(
    shapesOnly(parseModelConfig({ ...OLMOE_1B_7B, compressed_experts: { main_experts: 4 } })),
  );
  console.log(`  top-8 ${full.active}, top-4 + CE ${ce.active}`);
  assert.equal(full.total, 6_919_161_856); // OLMoE-1B-7B: 6.92B total
  assert.equal(Math.round(full.active / 1e7) / 100, 1.28);
  // Paper: 0.878B, -31.4%. Ours: 4 full experts + 4 * 3 * 2048 per layer.
  assert(Math.abs(ce.active / 1e9 - 0.878) < 0.002, `CE active ${ce.active}`);
  // The CE term itself (393,216 here, a fifth of the tolerance above), exactly: plain
  // top-k_m plus 3 * 2048 for each of the k - k_m aux experts, in each of the 16 layers.
  for (const km of [4, 2, 7]) {
    const withCe = countParams(
      shapesOnly(parseModelConfig({ ...OLMOE_1B_7B, compressed_experts: { main_experts: km } })),
    );
    const plain = countParams(
      shapesOnly(parseModelConfig({ ...OLMOE_1B_7B, num_experts_per_tok: km })),
    );
    assert.equal(withCe.active - plain.active, 16 * (8 - km) * 3 * 2048, `k_m=${km}`);
  }
  assert.equal(ce.active, 879_757_312);
  assert.equal(Math.round((1 - ce.active / full.active) * 1000) / 10, 31.4);
  // Stored: all 64 experts plus 64 * 3 * 2048 scaling entries per layer.
  assert.equal(ce.total, full.total + 16 * 64 * 3 * 2048);
});
