// Random checkpoints in the Hugging Face layout, for benchmarks at sizes we cannot
// download (one shard per layer, like real sharded checkpoints).

import { f32ToBf16Bits, type RawTensor, writeSafetensors } from "../io/safetensors.ts";
import { parseModelConfig } from "./config.ts";

/** Fast deterministic uniform(-a, a) samples as bf16 bytes (quality is irrelevant here). */
function randomBf16(n: number, seed: number, amplitude: number): Uint8Array {
  const f = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13, s ^= s >>> 17, s ^= s << 5;
    f[i] = ((s >>> 0) / 4294967296 - 0.5) * 2 * amplitude;
  }
  return new Uint8Array(f32ToBf16Bits(f).buffer);
}

/**
 * Write a DeepSeekMoE-layout bf16 checkpoint to `dir` (skipped when `dir/config.json`
 * already matches `config`). Returns the total weight bytes.
 */
export async function writeSyntheticDeepseek(
  dir: string,
  config: Record<string, unknown>,
): Promise<number> {
  const full = {
    model_type: "deepseek",
    architectures: ["DeepseekForCausalLM"],
    torch_dtype: "bfloat16",
    ...config,
  };
  const spec = parseModelConfig(full, `${dir}/config.json`);
  try {
    if (await Deno.readTextFile(`${dir}/config.json`) === JSON.stringify(full, null, 2)) {
      const index = JSON.parse(await Deno.readTextFile(`${dir}/model.safetensors.index.json`));
      return index.metadata.total_size;
    }
  } catch { /* not there yet: write it */ }
  await Deno.mkdir(dir, { recursive: true });
  const H = spec.hidden, amp = 0.05;
  let seed = 1, total = 0;
  const weightMap: Record<string, string> = {};
  const tensor = (name: string, shape: number[], amplitude = amp): RawTensor => ({
    name,
    dtype: "BF16",
    shape,
    bytes: randomBf16(shape.reduce((a, b) => a * b), seed++, amplitude),
  });
  const ones = (name: string): RawTensor => ({
    name,
    dtype: "BF16",
    shape: [H],
    bytes: new Uint8Array(f32ToBf16Bits(new Float32Array(H).fill(1)).buffer),
  });
  const writeShard = async (file: string, tensors: RawTensor[]) => {
    await writeSafetensors(`${dir}/${file}`, tensors);
    for (const t of tensors) (weightMap[t.name] = file), (total += t.bytes.length);
  };
  const nShards = spec.numLayers + 1;
  const shardName = (i: number) =>
    `model-${String(i + 1).padStart(5, "0")}-of-${String(nShards).padStart(5, "0")}.safetensors`;
  await writeShard(shardName(0), [
    tensor("model.embed_tokens.weight", [spec.vocab, H]),
    tensor("lm_head.weight", [spec.vocab, H]),
    ones("model.norm.weight"),
  ]);
  const qw = spec.heads * spec.headDim, kw = spec.kvHeads * spec.headDim;
  for (const layer of spec.layers) {
    const p = `model.layers.${layer.index}.`;
    const ts = [
      ones(`${p}input_layernorm.weight`),
      ones(`${p}post_attention_layernorm.weight`),
      tensor(`${p}self_attn.q_proj.weight`, [qw, H]),
      tensor(`${p}self_attn.k_proj.weight`, [kw, H]),
      tensor(`${p}self_attn.v_proj.weight`, [kw, H]),
      tensor(`${p}self_attn.o_proj.weight`, [H, qw]),
    ];
    const mlp = layer.mlp;
    if (mlp.kind === "moe") {
      ts.push(tensor(`${p}mlp.gate.weight`, [mlp.experts, H], 0.5));
      for (let e = 0; e < mlp.experts; e++) {
        ts.push(tensor(`${p}mlp.experts.${e}.gate_proj.weight`, [mlp.expertWidth, H]));
        ts.push(tensor(`${p}mlp.experts.${e}.up_proj.weight`, [mlp.expertWidth, H]));
        ts.push(tensor(`${p}mlp.experts.${e}.down_proj.weight`, [H, mlp.expertWidth]));
      }
      if (mlp.sharedWidth > 0) {
        ts.push(tensor(`${p}mlp.shared_experts.gate_proj.weight`, [mlp.sharedWidth, H]));
        ts.push(tensor(`${p}mlp.shared_experts.up_proj.weight`, [mlp.sharedWidth, H]));
        ts.push(tensor(`${p}mlp.shared_experts.down_proj.weight`, [H, mlp.sharedWidth]));
      }
    } else if (mlp.kind === "dense") {
      ts.push(tensor(`${p}mlp.gate_proj.weight`, [mlp.width, H]));
      ts.push(tensor(`${p}mlp.up_proj.weight`, [mlp.width, H]));
      ts.push(tensor(`${p}mlp.down_proj.weight`, [H, mlp.width]));
    }
    await writeShard(shardName(layer.index + 1), ts);
  }
  const index = { metadata: { total_size: total }, weight_map: weightMap };
  await Deno.writeTextFile(`${dir}/model.safetensors.index.json`, JSON.stringify(index));
  // config.json last: its presence marks a complete checkpoint.
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(full, null, 2));
  return total;
}
