// The layerwise section: peak memory of the layer-wise mode vs all weights resident, on a
// generated multi-GB sharded checkpoint (each mode in its own process, the bench script run
// with --child, peak RSS from /proc).

import { createBackend } from "../cli.ts";
import { forward } from "../model/decoder.ts";
import { Model } from "../model/model.ts";
import { writeSyntheticDeepseek } from "../model/synthetic.ts";
import type { BenchSection } from "./common.ts";

// A DeepSeekMoE-shaped model of 2.4 GB in bf16 (13 shards): big enough that "one layer resident"
// and "all resident" differ by an order of magnitude.
const SYNTHETIC_CONFIG = {
  vocab_size: 32000,
  hidden_size: 1024,
  intermediate_size: 4096,
  moe_intermediate_size: 512,
  num_hidden_layers: 12,
  num_attention_heads: 8,
  num_key_value_heads: 8,
  n_routed_experts: 64,
  n_shared_experts: 2,
  num_experts_per_tok: 6,
  first_k_dense_replace: 1,
  max_position_embeddings: 512,
};

/** Peak RSS of this process so far (VmHWM), in bytes. */
async function peakRss(): Promise<number> {
  const status = await Deno.readTextFile("/proc/self/status");
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

export async function layerwiseChild(mode: string, dir: string): Promise<void> {
  const model = await Model.load(dir, await createBackend("cpu"));
  const batch = 2, seqLen = 128;
  const ids = new Int32Array(batch * seqLen).map((_, i) => (i * 31) % 32000);
  const t0 = performance.now();
  await forward(model, ids, { batch, seqLen }, { layerwise: mode === "layerwise" });
  const seconds = (performance.now() - t0) / 1000;
  console.log(
    JSON.stringify({
      mode,
      seconds,
      peakRssBytes: await peakRss(),
      peakResidentWeightBytes: model.peakResidentBytes,
    }),
  );
}

async function benchLayerwise(dir: string, script: string) {
  console.error(`layerwise: generating/reusing the synthetic checkpoint in ${dir} ...`);
  const totalBytes = await writeSyntheticDeepseek(dir, SYNTHETIC_CONFIG);
  const rows: Record<string, unknown>[] = [];
  for (const mode of ["layerwise", "resident"]) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        script,
        "--child",
        mode,
        "--synthetic-dir",
        dir,
      ],
      stderr: "inherit",
    }).output();
    if (!out.success) throw new Error(`layerwise child (${mode}) failed`);
    rows.push(JSON.parse(new TextDecoder().decode(out.stdout)));
    console.error(
      `layerwise ${mode}: peak RSS ${
        (rows.at(-1)!.peakRssBytes as number / 2 ** 30).toFixed(2)
      } GiB`,
    );
  }
  // One layer's weights (the largest shard) for comparison.
  let largestLayer = 0;
  for (const e of Deno.readDirSync(dir)) {
    if (e.name.endsWith(".safetensors") && !e.name.startsWith("model-00001")) {
      largestLayer = Math.max(largestLayer, Deno.statSync(`${dir}/${e.name}`).size);
    }
  }
  return {
    config: SYNTHETIC_CONFIG,
    checkpointBytes: totalBytes,
    largestLayerBytes: largestLayer,
    runs: rows,
  };
}

export const layerwiseSection: BenchSection = {
  name: "layerwise",
  async run({ syntheticDir, script }) {
    return { layerwise: await benchLayerwise(syntheticDir, script) };
  },
};
