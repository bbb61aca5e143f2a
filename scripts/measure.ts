// Memory and speed of one or more model folders, side by side (ratios vs the first):
// weight bytes resident, peak process RSS, prefill and KV-cache decode tokens/s, total and
// active parameters per token (conventions in lib/eval/measure.ts). Writes versioned JSON
// under results/measure/.

import { createBackend, parseCli, positiveInt, runMain } from "../lib/cli.ts";
import { measureModel, median } from "../lib/eval/measure.ts";
import { writeJsonAtomic } from "../lib/io/results.ts";

const HELP = `usage: deno run -A --unstable-webgpu scripts/measure.ts [options]

  --models a,b        model folders (default: data/models/tiny-deepseek-moe); ratios are vs the first
  --backend cpu|webgpu (default: cpu)
  --batch N           sequences (default: 4)
  --prompt N          prefill length (default: 128)
  --decode N          decode steps with the KV cache (default: 32)
  --repeats N         interleaved rounds (each model once per round, after a warm-up);
                      the median is reported (default: 3)
  --output PATH       JSON file (default: results/measure/measure_<date>.json)
  -h, --help`;

const SCHEMA = "moe-condense/measure@1";

await runMain(async () => {
  const args = parseCli(HELP, {
    models: { type: "string" },
    backend: { type: "string" },
    batch: { type: "string" },
    prompt: { type: "string" },
    decode: { type: "string" },
    repeats: { type: "string" },
    output: { type: "string" },
  });
  args.backend ??= "cpu";
  const opts = {
    batch: positiveInt("batch", args.batch, 4),
    prompt: positiveInt("prompt", args.prompt, 128),
    decode: positiveInt("decode", args.decode, 32),
    repeats: positiveInt("repeats", args.repeats, 3),
  };
  const dirs = (args.models ?? "data/models/tiny-deepseek-moe").split(",").map((s) => s.trim())
    .filter(Boolean);
  // Interleaved rounds (every model once per round, each with its own warm-up) so JIT
  // warm-up and machine load do not drift into the ratios; median per model.
  const backend = await createBackend(args.backend);
  const runs = dirs.map(() => [] as Awaited<ReturnType<typeof measureModel>>[]);
  for (let r = 0; r < opts.repeats; r++) {
    for (const [i, dir] of dirs.entries()) {
      console.error(`round ${r + 1}/${opts.repeats}: ${dir}`);
      runs[i].push(await measureModel(dir, backend, { ...opts, repeats: 1 }));
    }
  }
  const models = runs.map((rs) => ({
    ...rs[0],
    peak_rss_bytes: Math.max(...rs.map((x) => x.peak_rss_bytes)),
    prefill_tokens_per_s: median(rs.map((x) => x.prefill_tokens_per_s)),
    decode_tokens_per_s: median(rs.map((x) => x.decode_tokens_per_s)),
    prefill_ms: rs.flatMap((x) => x.prefill_ms),
    decode_ms: rs.flatMap((x) => x.decode_ms),
  }));
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
    settings: { ...opts, warmup: 1, statistic: "median over interleaved rounds" },
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
});
