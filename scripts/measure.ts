// Memory and speed of one or more model folders, side by side: weight bytes resident,
// peak process RSS, prefill and KV-cache decode tokens/s (warmed up, median of repeats),
// total and active parameters per token. Writes versioned JSON under results/measure/.
//
// Active parameters per token (the MoE papers' convention, which also gives the default
// model's README figure 5,299,456): every parameter except the routed experts a token
// does not use, i.e. embeddings + attention + norms + dense / condensed MLPs + router +
// shared experts + top-k routed experts + lm_head. `active_compute` leaves out the input
// embedding table (a lookup, not a matmul); with tied embeddings lm_head counts once.

import { parseArgs } from "node:util";
import type { Backend } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { writeJsonAtomic } from "../lib/io/results.ts";
import { forward } from "../lib/model/decoder.ts";
import { createKvCache, forwardCached, freeKvCache } from "../lib/model/generate.ts";
import { Model } from "../lib/model/model.ts";

const HELP = `usage: deno run -A --unstable-webgpu scripts/measure.ts [options]

  --models a,b        model folders (default: data/models/tiny-deepseek-moe); ratios are vs the first
  --backend cpu|webgpu (default: cpu)
  --batch N           sequences (default: 4)
  --prompt N          prefill length (default: 128)
  --decode N          decode steps with the KV cache (default: 32)
  --repeats N         timed repeats after one warm-up; the median is reported (default: 3)
  --output PATH       JSON file (default: results/measure/measure_<date>.json)
  -h, --help`;

const SCHEMA = "moe-condense/measure@1";

async function createBackend(name: string): Promise<Backend> {
  if (name === "cpu") return new CpuBackend();
  const path = new URL("../lib/backend/webgpu.ts", import.meta.url).pathname;
  try {
    await Deno.stat(path);
  } catch {
    throw new Error(`--backend webgpu: ${path} does not exist yet`);
  }
  return await (await import(path)).createWebGpuBackend();
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b), m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Total / routed / active parameter counts from the checkpoint's tensor shapes. */
export function countParams(model: Model) {
  let total = 0, routed = 0, embedding = 0;
  const perExpert = new Map<number, number>(); // layer -> params of one routed expert
  for (const [name, file] of model.ckpt.files) {
    const n = file.tensors.get(name)!.shape.reduce((a, b) => a * b, 1);
    total += n;
    if (name === "model.embed_tokens.weight") embedding = n;
    const m = name.match(/^model\.layers\.(\d+)\.[^.]+\.experts\.(\d+)\./);
    if (m) {
      routed += n;
      if (m[2] === "0") perExpert.set(+m[1], (perExpert.get(+m[1]) ?? 0) + n);
    }
  }
  let activeRouted = 0;
  model.spec.layers.forEach((layer, l) => {
    if (layer.mlp.kind === "moe") activeRouted += layer.mlp.topK * (perExpert.get(l) ?? 0);
  });
  const active = total - routed + activeRouted;
  // Tied embeddings are also the lm_head, so they stay in the compute count.
  const activeCompute = model.spec.tieEmbeddings ? active : active - embedding;
  return { total, routed_experts: routed, active, active_compute: activeCompute, embedding };
}

async function measureModel(dir: string, backendName: string, opts: Record<string, number>) {
  const backend = await createBackend(backendName);
  const model = await Model.load(dir, backend);
  let peakRss = Deno.memoryUsage().rss;
  const sample = () => (peakRss = Math.max(peakRss, Deno.memoryUsage().rss));
  // Make every weight resident: that is what inference needs.
  for (const name of model.ckpt.files.keys()) await model.weight(name);
  sample();
  const { batch, prompt, decode, repeats } = opts;
  const vocab = model.spec.vocab;
  const ids = Int32Array.from(
    { length: batch * prompt },
    (_, i) => (i * 7919 + 13) % Math.min(vocab, 256),
  );

  const prefillTimes: number[] = [], decodeTimes: number[] = [];
  for (let r = 0; r <= repeats; r++) {
    let t0 = performance.now();
    await forward(model, ids, { batch, seqLen: prompt });
    const prefill = performance.now() - t0;
    sample();
    // Decode: prefill into a cache (untimed), then `decode` single-token steps.
    const cache = createKvCache(model, batch, prompt + decode);
    await forwardCached(model, ids, prompt, cache, true);
    let next = Int32Array.from({ length: batch }, (_, b) => (b * 31) % 256);
    t0 = performance.now();
    for (let s = 0; s < decode; s++) {
      const logits = await forwardCached(model, next, 1, cache, true);
      next = Int32Array.from({ length: batch }, (_, b) => argmax(logits, b, vocab));
    }
    const dec = performance.now() - t0;
    sample();
    freeKvCache(model, cache);
    if (r > 0) prefillTimes.push(prefill), decodeTimes.push(dec); // r = 0 is the warm-up
  }
  const result = {
    model: dir,
    device: backend.description,
    params: countParams(model),
    weight_bytes_resident: model.residentBytes,
    weight_bytes_on_disk: [...new Set(model.ckpt.files.values())].reduce(
      (s, f) => s + fileBytes(f),
      0,
    ),
    peak_rss_bytes: peakRss,
    prefill_tokens_per_s: (batch * prompt) / (median(prefillTimes) / 1000),
    decode_tokens_per_s: (batch * decode) / (median(decodeTimes) / 1000),
    prefill_ms: prefillTimes,
    decode_ms: decodeTimes,
  };
  model.close();
  return result;
}

function argmax(logits: Float32Array, row: number, vocab: number): number {
  let best = 0;
  for (let j = 1; j < vocab; j++) {
    if (logits[row * vocab + j] > logits[row * vocab + best]) best = j;
  }
  return best;
}

function fileBytes(f: unknown): number {
  const path = (f as { path?: string }).path;
  try {
    return path ? Deno.statSync(path).size : 0;
  } catch {
    return 0;
  }
}

async function main() {
  const { values: args } = parseArgs({
    options: {
      models: { type: "string", default: "data/models/tiny-deepseek-moe" },
      backend: { type: "string", default: "cpu" },
      batch: { type: "string", default: "4" },
      prompt: { type: "string", default: "128" },
      decode: { type: "string", default: "32" },
      repeats: { type: "string", default: "3" },
      output: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (args.help) return console.log(HELP);
  const opts = {
    batch: Number(args.batch),
    prompt: Number(args.prompt),
    decode: Number(args.decode),
    repeats: Number(args.repeats),
  };
  for (const [k, v] of Object.entries(opts)) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`--${k} must be a positive integer`);
  }
  const dirs = args.models!.split(",").map((s) => s.trim()).filter(Boolean);
  const models = [];
  for (const dir of dirs) {
    console.error(`measuring ${dir} ...`);
    models.push(await measureModel(dir, args.backend!, opts));
  }
  const base = models[0];
  const ratio = (a: number, b: number) => Math.round((a / b) * 1000) / 1000;
  const rows = models.map((m) => ({
    ...m,
    ratios_vs_first: {
      total_params: ratio(m.params.total, base.params.total),
      active_params: ratio(m.params.active, base.params.active),
      weight_bytes_resident: ratio(m.weight_bytes_resident, base.weight_bytes_resident),
      peak_rss: ratio(m.peak_rss_bytes, base.peak_rss_bytes),
      prefill_tokens_per_s: ratio(m.prefill_tokens_per_s, base.prefill_tokens_per_s),
      decode_tokens_per_s: ratio(m.decode_tokens_per_s, base.decode_tokens_per_s),
    },
  }));
  const out = {
    schema: SCHEMA,
    date: new Date().toISOString(),
    backend: args.backend,
    settings: { ...opts, warmup: 1, statistic: "median" },
    active_params_convention:
      "all parameters except unselected routed experts (embeddings, attention, norms, dense MLPs, router, shared experts, top-k routed experts, lm_head); active_compute excludes the input embedding",
    peak_rss_note:
      "max of Deno.memoryUsage().rss sampled after loading and after each timed phase; process-wide, so later models in one run include what earlier ones left (run one model per process for exact numbers)",
    models: rows,
  };
  const file = args.output ??
    `results/measure/measure_${out.date.replaceAll(":", "-").replace(/\.\d+Z$/, "")}.json`;
  await writeJsonAtomic(file, out);

  const mb = (b: number) => (b / 2 ** 20).toFixed(1);
  const header = [
    "model",
    "total params",
    "active",
    "weights MiB",
    "peak RSS MiB",
    "prefill tok/s",
    "decode tok/s",
  ];
  console.log(
    `batch ${opts.batch}, prompt ${opts.prompt}, decode ${opts.decode}, median of ${opts.repeats} (${args.backend})`,
  );
  console.log(`|${header.join("|")}|\n|${header.map((_, i) => (i ? "---:" : "---")).join("|")}|`);
  for (const m of rows) {
    const r = m.ratios_vs_first;
    console.log(
      `|${m.model.split("/").pop()}|${m.params.total.toLocaleString("en")} (${r.total_params}x)|` +
        `${m.params.active.toLocaleString("en")} (${r.active_params}x)|${
          mb(m.weight_bytes_resident)
        } (${r.weight_bytes_resident}x)|` +
        `${mb(m.peak_rss_bytes)}|${
          m.prefill_tokens_per_s.toFixed(0)
        } (${r.prefill_tokens_per_s}x)|` +
        `${m.decode_tokens_per_s.toFixed(1)} (${r.decode_tokens_per_s}x)|`,
    );
  }
  console.log(`written ${file}`);
}

try {
  await main();
} catch (e) {
  console.error(`error: ${(e as Error).message}`);
  Deno.exit(1);
}
