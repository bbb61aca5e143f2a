// deno task bench: speed and memory, measured side by side in one run, written to
// results/bench/<date>.json. Each section is a file in lib/bench/ saying what it measures:
//   matmul      GFLOP/s per backend and dtype; on webgpu the roofline, kernel ladder, backward
//   attention   the webgpu attention kernels, forward and backward, against the CPU
//   forward     default-model forward tokens/s per backend
//   decode      greedy decoding with the KV cache: tokens/s, submits and GPU time per token
//   train       training tokens/s per backend
//   layerwise   peak memory of the layer-wise mode vs all weights resident
//   divergence  the searches' JS divergence per entry, JS, SIMD and WebGPU
//   wasm-gemm   the WebAssembly SIMD GEMM (the matmul without OpenBLAS) beside OpenBLAS, GFLOP/s
//   scale       only when named: the pipeline on synthesized prefixes of published models,
//               its cost model and projections to the paper's settings (minutes)
// A section is a BenchSection ({ name, run }) registered by one line in SECTIONS; they run
// in that order, each adding its keys to the result.

import type { Backend } from "../lib/backend/backend.ts";
import { attentionSection } from "../lib/bench/attention.ts";
import type { BenchSection } from "../lib/bench/common.ts";
import { decodeSection } from "../lib/bench/decode.ts";
import { divergenceSection } from "../lib/bench/divergence.ts";
import { forwardSection } from "../lib/bench/forward.ts";
import { layerwiseChild, layerwiseSection } from "../lib/bench/layerwise.ts";
import { matmulSection } from "../lib/bench/matmul.ts";
import { scaleSection } from "../lib/bench/scale.ts";
import { trainSection } from "../lib/bench/train.ts";
import { wasmGemmSection } from "../lib/bench/wasm_gemm.ts";
import { createBackend, parseCli, positiveInt, runMain, UsageError } from "../lib/cli.ts";
import { gitCommit, writeJsonAtomic } from "../lib/io/results.ts";

const SECTIONS: BenchSection[] = [
  matmulSection,
  attentionSection,
  forwardSection,
  decodeSection,
  trainSection,
  layerwiseSection,
  divergenceSection,
  wasmGemmSection,
  scaleSection,
];
const SECTION_NAMES = SECTIONS.map((s) => s.name);
/** Sections that run only when --only names them. */
const ON_REQUEST = ["scale"];

const USAGE = `Usage: deno task bench [options]

  --only LIST        sections to run: ${SECTION_NAMES.join(",")}
                     (default all but ${ON_REQUEST.join(",")})
  --backends LIST    cpu,cpu-reference,webgpu (default all; an unavailable one is recorded, not fatal)
  --model DIR        model for the forward section (default data/models/tiny-deepseek-moe)
  --repeats N        timed repeats per measurement, median reported (default 3)
  --synthetic-dir D  where the generated checkpoint is cached (default results/tmp/synthetic-moe)
  --out FILE         result JSON (default results/bench/<date>.json)`;

const SCHEMA_VERSION = 1;
const DEFAULT_MODEL = new URL("../data/models/tiny-deepseek-moe", import.meta.url).pathname;

await runMain(async () => {
  const args = parseCli(USAGE, {
    only: { type: "string" },
    backends: { type: "string" },
    model: { type: "string" },
    repeats: { type: "string" },
    "synthetic-dir": { type: "string" },
    out: { type: "string" },
    child: { type: "string" },
  });
  const syntheticDir = args["synthetic-dir"] ??
    new URL("../results/tmp/synthetic-moe", import.meta.url).pathname;
  if (args.child) return await layerwiseChild(args.child, syntheticDir);

  const sections = (args.only ?? SECTION_NAMES.filter((s) => !ON_REQUEST.includes(s)).join(","))
    .split(",");
  for (const s of sections) {
    if (!SECTION_NAMES.includes(s)) throw new UsageError(`unknown section "${s}"`);
  }
  const repeats = positiveInt("repeats", args.repeats, 3);
  const backends = new Map<string, Backend>();
  const unavailable: Record<string, string> = {};
  for (const name of (args.backends ?? "cpu,cpu-reference,webgpu").split(",")) {
    try {
      backends.set(name, await createBackend(name));
    } catch (e) {
      if (e instanceof UsageError) throw e;
      unavailable[name] = (e as Error).message;
      console.error(`backend ${name} unavailable: ${(e as Error).message}`);
    }
  }
  const t0 = performance.now();
  const result: Record<string, unknown> = {
    schema_version: SCHEMA_VERSION,
    kind: "bench",
    git_commit: await gitCommit(),
    date: new Date().toISOString(),
    host: {
      os: Deno.build.os,
      arch: Deno.build.arch,
      deno: Deno.version.deno,
      cpus: navigator.hardwareConcurrency,
    },
    backends: Object.fromEntries([...backends].map(([n, b]) => [n, b.description])),
    unavailable,
    settings: { sections, repeats, model: args.model ?? DEFAULT_MODEL },
  };
  const ctx = {
    backends,
    repeats,
    modelDir: args.model ?? DEFAULT_MODEL,
    syntheticDir,
    script: new URL(import.meta.url).pathname,
    result,
  };
  for (const section of SECTIONS) {
    if (sections.includes(section.name)) Object.assign(result, await section.run(ctx));
  }
  result.wall_seconds = (performance.now() - t0) / 1000;
  const out = args.out ??
    new URL(
      `../results/bench/${result.date!.toString().replace(/[:.]/g, "-")}.json`,
      import.meta.url,
    ).pathname;
  await writeJsonAtomic(out, result);
  console.error(`wrote ${out}`);
});
