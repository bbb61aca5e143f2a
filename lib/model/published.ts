// The published configurations of the MoE models our users compress, and the tensors a
// checkpoint with such a config holds (names and shapes in Hugging Face's state-dict
// order). `deno task synthesize` writes random weights in exactly these shapes, so the
// whole pipeline can run at real scale without downloading the models.

import { CheckpointError, writeFolder, writeTextNamed, writeWeights } from "../io/checkpoint.ts";
import { f32ToBf16Bits } from "../io/safetensors.ts";

/** A published model: its config.json as released, and where it comes from. */
export interface PublishedModel {
  /** The config.json these values are copied from. */
  source: string;
  config: Record<string, unknown>;
}

// Copied from each repository's config.json (main branch); keys the loader does not read
// (auto_map, initializer_range, router_aux_loss_coef, ...) are kept as released.
export const PUBLISHED: Record<string, PublishedModel> = {
  "deepseek-moe-16b": {
    source: "https://huggingface.co/deepseek-ai/deepseek-moe-16b-base/blob/main/config.json",
    config: {
      architectures: ["DeepseekForCausalLM"],
      attention_bias: false,
      attention_dropout: 0.0,
      auto_map: {
        AutoConfig: "configuration_deepseek.DeepseekConfig",
        AutoModel: "modeling_deepseek.DeepseekModel",
        AutoModelForCausalLM: "modeling_deepseek.DeepseekForCausalLM",
      },
      aux_loss_alpha: 0.001,
      bos_token_id: 100000,
      eos_token_id: 100001,
      first_k_dense_replace: 1,
      hidden_act: "silu",
      hidden_size: 2048,
      initializer_range: 0.02,
      intermediate_size: 10944,
      max_position_embeddings: 4096,
      model_type: "deepseek",
      moe_intermediate_size: 1408,
      moe_layer_freq: 1,
      n_routed_experts: 64,
      n_shared_experts: 2,
      norm_topk_prob: false,
      num_attention_heads: 16,
      num_experts_per_tok: 6,
      num_hidden_layers: 28,
      num_key_value_heads: 16,
      pretraining_tp: 1,
      rms_norm_eps: 1e-6,
      rope_scaling: null,
      rope_theta: 10000,
      scoring_func: "softmax",
      seq_aux: true,
      tie_word_embeddings: false,
      torch_dtype: "bfloat16",
      transformers_version: "4.36.0",
      use_cache: true,
      vocab_size: 102400,
    },
  },
  "qwen1.5-moe-a2.7b": {
    source: "https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json",
    config: {
      architectures: ["Qwen2MoeForCausalLM"],
      attention_dropout: 0.0,
      bos_token_id: 151643,
      decoder_sparse_step: 1,
      eos_token_id: 151643,
      hidden_act: "silu",
      hidden_size: 2048,
      initializer_range: 0.02,
      intermediate_size: 5632,
      max_position_embeddings: 8192,
      max_window_layers: 21,
      model_type: "qwen2_moe",
      moe_intermediate_size: 1408,
      norm_topk_prob: false,
      num_attention_heads: 16,
      num_experts: 60,
      num_experts_per_tok: 4,
      num_hidden_layers: 24,
      num_key_value_heads: 16,
      output_router_logits: false,
      rms_norm_eps: 1e-6,
      rope_theta: 1000000.0,
      router_aux_loss_coef: 0.001,
      shared_expert_intermediate_size: 5632,
      sliding_window: 32768,
      tie_word_embeddings: false,
      torch_dtype: "bfloat16",
      transformers_version: "4.40.0.dev0",
      use_cache: true,
      use_sliding_window: false,
      vocab_size: 151936,
    },
  },
  "olmoe-1b-7b": {
    source: "https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json",
    config: {
      architectures: ["OlmoeForCausalLM"],
      attention_bias: false,
      attention_dropout: 0.0,
      clip_qkv: null,
      eos_token_id: 50279,
      hidden_act: "silu",
      hidden_size: 2048,
      initializer_range: 0.02,
      intermediate_size: 1024,
      max_position_embeddings: 4096,
      model_type: "olmoe",
      norm_topk_prob: false,
      num_attention_heads: 16,
      num_experts: 64,
      num_experts_per_tok: 8,
      num_hidden_layers: 16,
      num_key_value_heads: 16,
      output_router_logits: false,
      pad_token_id: 1,
      rms_norm_eps: 1e-5,
      rope_scaling: null,
      rope_theta: 10000.0,
      router_aux_loss_coef: 0.01,
      tie_word_embeddings: false,
      torch_dtype: "bfloat16",
      transformers_version: "4.43.0.dev0",
      use_cache: true,
      vocab_size: 50304,
    },
  },
  "mixtral-8x7b": {
    source: "https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json",
    config: {
      architectures: ["MixtralForCausalLM"],
      attention_dropout: 0.0,
      bos_token_id: 1,
      eos_token_id: 2,
      hidden_act: "silu",
      hidden_size: 4096,
      initializer_range: 0.02,
      intermediate_size: 14336,
      max_position_embeddings: 32768,
      model_type: "mixtral",
      num_attention_heads: 32,
      num_experts_per_tok: 2,
      num_hidden_layers: 32,
      num_key_value_heads: 8,
      num_local_experts: 8,
      output_router_logits: false,
      rms_norm_eps: 1e-5,
      rope_theta: 1e6,
      router_aux_loss_coef: 0.02,
      sliding_window: null,
      tie_word_embeddings: false,
      torch_dtype: "bfloat16",
      transformers_version: "4.36.0.dev0",
      use_cache: true,
      vocab_size: 32000,
    },
  },
  "qwen3-30b-a3b": {
    source: "https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json",
    config: {
      architectures: ["Qwen3MoeForCausalLM"],
      attention_bias: false,
      attention_dropout: 0.0,
      bos_token_id: 151643,
      decoder_sparse_step: 1,
      eos_token_id: 151645,
      head_dim: 128,
      hidden_act: "silu",
      hidden_size: 2048,
      initializer_range: 0.02,
      intermediate_size: 6144,
      max_position_embeddings: 40960,
      max_window_layers: 48,
      mlp_only_layers: [],
      model_type: "qwen3_moe",
      moe_intermediate_size: 768,
      norm_topk_prob: true,
      num_attention_heads: 32,
      num_experts: 128,
      num_experts_per_tok: 8,
      num_hidden_layers: 48,
      num_key_value_heads: 4,
      output_router_logits: false,
      rms_norm_eps: 1e-6,
      rope_scaling: null,
      rope_theta: 1000000.0,
      router_aux_loss_coef: 0.001,
      sliding_window: null,
      tie_word_embeddings: false,
      torch_dtype: "bfloat16",
      transformers_version: "4.51.0",
      use_cache: true,
      use_sliding_window: false,
      vocab_size: 151936,
    },
  },
};

/**
 * One tensor of a checkpoint and how a synthesized one fills it: "ones" (norm weights),
 * or uniform random values of standard deviation `std`.
 */
export interface PlannedWeight {
  name: string;
  shape: number[];
  init: "ones" | { std: number };
}

/**
 * Every tensor of a checkpoint with `config` (one of the supported model types, or
 * qwen3_moe), in the order the Hugging Face model class registers them.
 *
 * Standard deviations keep every block's output of the order of its input, so routing
 * is neither uniform nor one-hot: a router row has std 1/sqrt(hidden), so its logits on
 * an RMS-normed input have std about 1 (about what trained routers show; the std of
 * 0.02 the configs name for initialisation would give near-uniform routing); projections
 * in have std 1/sqrt(fan in), so activations stay of order one.
 */
export function checkpointWeights(config: Record<string, unknown>): PlannedWeight[] {
  const c = config as Record<string, number>;
  const type = config.model_type as string;
  const H = c.hidden_size, L = c.num_hidden_layers, heads = c.num_attention_heads;
  const kvHeads = c.num_key_value_heads ?? heads;
  const headDim = c.head_dim ?? H / heads;
  const out: PlannedWeight[] = [];
  const linear = (name: string, rows: number, cols: number) =>
    out.push({ name, shape: [rows, cols], init: { std: 1 / Math.sqrt(cols) } });
  const bias = (name: string, n: number) => out.push({ name, shape: [n], init: { std: 0.02 } });
  const ones = (name: string, n: number) => out.push({ name, shape: [n], init: "ones" });
  const swiglu = (
    prefix: string,
    width: number,
    [g, u, d] = ["gate_proj", "up_proj", "down_proj"],
  ) => {
    linear(`${prefix}${g}.weight`, width, H);
    linear(`${prefix}${u}.weight`, width, H);
    linear(`${prefix}${d}.weight`, H, width);
  };
  const experts = (prefix: string, n: number, width: number, projs?: [string, string, string]) => {
    for (let e = 0; e < n; e++) swiglu(`${prefix}experts.${e}.`, width, projs);
  };
  out.push({ name: "model.embed_tokens.weight", shape: [c.vocab_size, H], init: { std: 1 } });
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`, a = `${p}self_attn.`;
    const attentionBias = type === "qwen2_moe" || config.attention_bias === true;
    linear(`${a}q_proj.weight`, heads * headDim, H);
    if (attentionBias) bias(`${a}q_proj.bias`, heads * headDim);
    linear(`${a}k_proj.weight`, kvHeads * headDim, H);
    if (attentionBias) bias(`${a}k_proj.bias`, kvHeads * headDim);
    linear(`${a}v_proj.weight`, kvHeads * headDim, H);
    if (attentionBias) bias(`${a}v_proj.bias`, kvHeads * headDim);
    linear(`${a}o_proj.weight`, H, heads * headDim);
    if (attentionBias && type !== "qwen2_moe") bias(`${a}o_proj.bias`, H);
    if (type === "olmoe") {
      // OLMoE normalises the whole q and k projections, Qwen3 each head.
      ones(`${a}q_norm.weight`, heads * headDim);
      ones(`${a}k_norm.weight`, kvHeads * headDim);
    } else if (type === "qwen3_moe") {
      ones(`${a}q_norm.weight`, headDim);
      ones(`${a}k_norm.weight`, headDim);
    }
    const m = `${p}mlp.`;
    switch (type) {
      case "deepseek": {
        const moe = l >= c.first_k_dense_replace && l % (c.moe_layer_freq ?? 1) === 0;
        if (!moe) swiglu(m, c.intermediate_size);
        else {
          experts(m, c.n_routed_experts, c.moe_intermediate_size);
          linear(`${m}gate.weight`, c.n_routed_experts, H);
          if (c.n_shared_experts) {
            swiglu(`${m}shared_experts.`, c.n_shared_experts * c.moe_intermediate_size);
          }
        }
        break;
      }
      case "qwen2_moe":
      case "qwen3_moe": {
        const dense = ((config.mlp_only_layers ?? []) as number[]).includes(l) ||
          c.num_experts === 0 ||
          (l + 1) % (c.decoder_sparse_step ?? 1) !== 0;
        if (dense) {
          swiglu(m, c.intermediate_size);
          break;
        }
        linear(`${m}gate.weight`, c.num_experts, H);
        experts(m, c.num_experts, c.moe_intermediate_size);
        if (type === "qwen2_moe" && c.shared_expert_intermediate_size > 0) {
          swiglu(`${m}shared_expert.`, c.shared_expert_intermediate_size);
          linear(`${m}shared_expert_gate.weight`, 1, H);
        }
        break;
      }
      case "olmoe":
        linear(`${m}gate.weight`, c.num_experts, H);
        experts(m, c.num_experts, c.intermediate_size);
        break;
      case "mixtral": {
        const b = `${p}block_sparse_moe.`;
        linear(`${b}gate.weight`, c.num_local_experts, H);
        experts(b, c.num_local_experts, c.intermediate_size, ["w1", "w3", "w2"]);
        break;
      }
      default:
        throw new Error(`no tensor layout for model_type "${type}"`);
    }
    ones(`${p}input_layernorm.weight`, H);
    ones(`${p}post_attention_layernorm.weight`, H);
  }
  ones("model.norm.weight", H);
  if (config.tie_word_embeddings !== true) linear("lm_head.weight", c.vocab_size, H);
  return out;
}

/**
 * bf16 bytes of a PlannedWeight filled from a seed: uniform in [-a, a] with a = std sqrt(3),
 * as 65,536 equally likely levels (a table of their bf16 values, indexed by 16 random bits:
 * xorshift32 seeded from the tensor's name, so a model's first layers are the same whatever
 * its depth). A table lookup a value instead of float arithmetic and rounding: 3.2-3.7
 * against 4.6-5.0 ns a value.
 */
export function synthesizeBf16(w: PlannedWeight, seed: number): Uint8Array {
  const n = w.shape.reduce((a, b) => a * b, 1);
  const out = new Uint16Array(n);
  if (w.init === "ones") return new Uint8Array(out.fill(0x3f80).buffer);
  const a = w.init.std * Math.sqrt(3);
  const levels = new Float32Array(65536);
  for (let k = 0; k < 65536; k++) levels[k] = ((k + 0.5) / 32768 - 1) * a;
  const table = f32ToBf16Bits(levels);
  let s = (hashName(w.name) ^ Math.imul(seed, 0x9e3779b9)) | 0 || 1;
  for (let i = 0; i < n; i += 2) {
    s ^= s << 13, s ^= s >>> 17, s ^= s << 5;
    out[i] = table[s & 0xffff];
    if (i + 1 < n) out[i + 1] = table[s >>> 16];
  }
  return new Uint8Array(out.buffer);
}

/** FNV-1a of a string. */
function hashName(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

export interface SynthesizeOptions {
  /** Keep the first `layers` decoder layers (default: all). */
  layers?: number;
  seed?: number;
  /** Largest shard (default: Hugging Face's 5 GB). */
  maxShardBytes?: number;
  /** Folder whose tokenizer files are copied (the default model's byte-level tokenizer). */
  tokenizerDir: string;
  /** Called as weights are written, with (bytes done, total bytes). */
  progress?: (done: number, total: number) => void;
}

const TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"];

/** config.json of a synthesized `like` with its first `layers` layers, and its provenance. */
export function synthesizedConfig(like: string, layers: number | undefined, seed: number) {
  const published = PUBLISHED[like];
  if (!published) {
    throw new Error(`no published config "${like}" (${Object.keys(PUBLISHED).join(", ")})`);
  }
  const full = published.config.num_hidden_layers as number;
  if (layers !== undefined && (!Number.isSafeInteger(layers) || layers < 1 || layers > full)) {
    throw new Error(`${like} has ${full} layers; cannot keep ${layers}`);
  }
  return {
    ...published.config,
    num_hidden_layers: layers ?? full,
    // Not read by any loader: where the shapes come from, and that the weights are random.
    synthetic: { like, source: published.source, seed, published_num_hidden_layers: full },
  };
}

/**
 * Write a checkpoint folder with `config`'s exact tensors, random bf16 (synthesizeBf16),
 * sharded with an index as save_pretrained writes it, and the tokenizer files of
 * `tokenizerDir`. Each tensor is made just before it is written, so memory stays at one
 * tensor. Written into a temp folder renamed at the end. Returns the weight bytes.
 */
export async function synthesizeCheckpoint(
  config: Record<string, unknown>,
  outDir: string,
  opts: SynthesizeOptions,
): Promise<number> {
  const seed = opts.seed ?? 0;
  const weights = checkpointWeights(config);
  const total = weights.reduce((n, w) => n + 2 * w.shape.reduce((a, b) => a * b, 1), 0);
  let done = 0;
  opts.progress?.(0, total);
  const tensors = weights.map((w) => ({
    name: w.name,
    dtype: "BF16" as const,
    shape: w.shape,
    bytes: () => {
      const bytes = synthesizeBf16(w, seed);
      done += bytes.length;
      opts.progress?.(done, total);
      return bytes;
    },
  }));
  await writeFolder(outDir, async (tmp) => {
    await writeWeights(tmp, tensors, { sharded: true, maxShardBytes: opts.maxShardBytes });
    for (const f of TOKENIZER_FILES) {
      try {
        await Deno.copyFile(`${opts.tokenizerDir}/${f}`, `${tmp}/${f}`);
      } catch (e) {
        throw new CheckpointError(`${tmp}/${f}`, `copy failed (${(e as Error).message})`);
      }
    }
    // config.json last, as every loader starts there.
    await writeTextNamed(`${tmp}/config.json`, JSON.stringify(config, null, 2) + "\n");
  });
  return total;
}
