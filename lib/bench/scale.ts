// deno task bench --only scale: the pipeline on synthesized prefixes of published models
// (lib/model/published.ts) with --layerwise, each stage measured in a child process
// (seconds, peak RSS, bytes read and written; FLOPs and divergence entries from the cost
// model below). Per-unit rates fitted on the smaller calibration set predict the larger
// one (the check of the model), then project the paper's full settings on this machine
// and on a GPU of a stated f32 rate and bandwidth. Also the fast expert search against
// the reference procedure (--naive) at the DeepSeekMoE-16B layer shape.

import { type ModelSpec, moeLayers, parseModelConfig } from "../model/config.ts";
import { PUBLISHED, synthesizeCheckpoint, synthesizedConfig } from "../model/published.ts";
import { DEFAULT_MODEL } from "../methods/cli.ts";
import { runSearchJob, type SearchSettings } from "../methods/search_job.ts";
import { condenseFromSearch } from "../methods/condense_job.ts";
import { expertCandidateCount, expertSearchNaive } from "../methods/expert_search.ts";
import { layerCandidateCount } from "../methods/layer_search.ts";
import { CpuBackend } from "../backend/cpu.ts";
import { Model } from "../model/model.ts";
import { loadTokenizer } from "../io/tokenizer.ts";
import { loadCalibration } from "../methods/calibration.ts";
import type { BenchSection } from "./common.ts";

const ROOT = new URL("../../", import.meta.url).pathname;
const DATA = `${ROOT}data/valid_sotu.jsonl`;
const SEQ_LEN = 256;
/** Cached activations in memory before spilling: small, so the runs spill as at real scale. */
const CACHE_MEMORY = 256 * 2 ** 20;

/**
 * The prefixes measured (every decoder layer of these is searched) and the experts kept:
 * DeepSeekMoE-16B's own k = 6 (its fast search is compared with the naive one), 2 for
 * OLMoE (its 8 would only add candidates, each costing what the model already counts).
 */
const PREFIXES = [
  { like: "olmoe-1b-7b", layers: 2, k: 2 },
  { like: "deepseek-moe-16b", layers: 2, k: 6 },
];
/** Calibration documents of 256 tokens: rates are fitted on the first, checked on the second. */
const SIZES = [2, 4];
const NAIVE_CANDIDATES = 3;

/**
 * The stated GPU of the projection: an H100-class card at what tiled f32 kernels reach
 * (about half its 67 TFLOP/s f32 peak, 70% of its 3.35 TB/s), weights read once from an
 * NVMe disk (the 16B model's 33 GB of bf16 fit in its 80 GB, so nothing is re-read).
 */
const GPU = {
  name: "H100-class (stated, not measured)",
  f32FlopsPerSecond: 30e12,
  bytesPerSecond: 2.3e12,
  diskBytesPerSecond: 2e9,
  /** Bytes a divergence entry moves: candidate inputs x, base, expert, p and the JS pass. */
  bytesPerEntry: 24,
};

/** The paper's settings (CD-MoE): 100 documents x 256 tokens, up to 15 layers searched. */
const PAPER = [
  { like: "deepseek-moe-16b", k: 6, n: 15, docs: 100 },
  { like: "qwen1.5-moe-a2.7b", k: 4, n: 15, docs: 100 },
];

// ---- the cost model ---------------------------------------------------------------------

/** FLOPs of one token through layer l (causal attention over `seqLen`, unchanged MLP). */
export function layerFlopsPerToken(spec: ModelSpec, l: number, seqLen: number): number {
  const H = spec.hidden, q = spec.heads * spec.headDim, kv = spec.kvHeads * spec.headDim;
  const attention = 2 * H * (q + 2 * kv) + 2 * q * H + 2 * q * seqLen; // QK^T and PV, causal
  const mlp = spec.layers[l].mlp;
  if (mlp.kind === "dense") return attention + 6 * H * mlp.width;
  if (mlp.kind === "none") return attention;
  return attention + 2 * H * mlp.experts + 6 * H * (mlp.topK * mlp.expertWidth + mlp.sharedWidth);
}

/** FLOPs of one token through MoE layer l condensed to `k` experts (+ shared). */
function condensedFlopsPerToken(spec: ModelSpec, l: number, seqLen: number, k: number): number {
  const mlp = spec.layers[l].mlp as {
    expertWidth: number;
    sharedWidth: number;
    topK: number;
    experts: number;
  };
  return layerFlopsPerToken(spec, l, seqLen) - 2 * spec.hidden * mlp.experts -
    6 * spec.hidden * (mlp.topK - k) * mlp.expertWidth;
}

/** Bytes of layer l's weights in the checkpoint (bf16). */
function layerBytes(spec: ModelSpec, l: number): number {
  const H = spec.hidden, q = spec.heads * spec.headDim, kv = spec.kvHeads * spec.headDim;
  const mlp = spec.layers[l].mlp;
  const mlpParams = mlp.kind === "dense"
    ? 3 * H * mlp.width
    : mlp.kind === "moe"
    ? H * mlp.experts + 3 * H * (mlp.experts * mlp.expertWidth + mlp.sharedWidth)
    : 0;
  return 2 * (H * (q + 2 * kv) + q * H + mlpParams + 2 * H);
}

/** Bytes a condensed MoE layer reads (bf16): attention, norms, shared and `k` kept experts. */
function condensedBytes(spec: ModelSpec, l: number, k: number): number {
  const mlp = spec.layers[l].mlp as { experts: number; expertWidth: number };
  return layerBytes(spec, l) -
    2 * spec.hidden * (mlp.experts + 3 * (mlp.experts - k) * mlp.expertWidth);
}

/** Bytes of the whole checkpoint (bf16): embeddings, layers, head. */
function modelBytes(spec: ModelSpec): number {
  let bytes = 2 * spec.vocab * spec.hidden * (spec.tieEmbeddings ? 1 : 2);
  for (let l = 0; l < spec.numLayers; l++) bytes += layerBytes(spec, l);
  return bytes;
}

/** What a stage costs in the model's units. */
interface Work {
  /** Matmul-bound FLOPs (layer forwards). */
  flops: number;
  /** The expert outputs' FLOPs (every expert on every token). */
  expertFlops: number;
  /** Divergence entries (tokens x hidden per candidate scored). */
  entries: number;
  /** Weight bytes read (layer-wise: every layer forward reads its layer). */
  weightBytes: number;
}

const noWork = (): Work => ({ flops: 0, expertFlops: 0, entries: 0, weightBytes: 0 });

/** The whole search (profile, expert search of every MoE layer, layer search of sr). */
export function searchWork(spec: ModelSpec, tokens: number, k: number, n: number) {
  const L = spec.numLayers, moe = moeLayers(spec), H = spec.hidden;
  const profile = noWork(), experts = noWork(), layers = noWork();
  for (let l = 0; l < L; l++) {
    profile.flops += tokens * layerFlopsPerToken(spec, l, SEQ_LEN);
    profile.weightBytes += layerBytes(spec, l);
  }
  for (const l of moe) {
    const mlp = spec.layers[l].mlp as { experts: number; expertWidth: number; sharedWidth: number };
    experts.expertFlops += tokens * 6 * H * (mlp.experts * mlp.expertWidth + mlp.sharedWidth);
    experts.entries += expertCandidateCount(mlp.experts, k) * tokens * H;
  }
  // Layer search: at step s each remaining candidate c reruns its changed layer and every
  // layer after it. Which layers the search picks decides the sum; the model takes the
  // candidates still in play as spread like all MoE layers.
  for (let s = 0; s < n; s++) {
    const share = (moe.length - s) / moe.length;
    for (const c of moe) {
      layers.flops += share * tokens * condensedFlopsPerToken(spec, c, SEQ_LEN, k);
      layers.weightBytes += share * condensedBytes(spec, c, k);
      for (let l = c + 1; l < L; l++) {
        layers.flops += share * tokens * layerFlopsPerToken(spec, l, SEQ_LEN);
        layers.weightBytes += share * layerBytes(spec, l);
      }
    }
    layers.entries += (moe.length - s) * tokens * H;
  }
  return { profile, experts, layers, candidates: layerCandidateCount(moe.length, n) };
}

/**
 * Seconds per unit on this machine, fitted from measured stages: a FLOP (from the expert
 * outputs, the purest matmul stage), a weight byte loaded into a layer (the profile pass
 * less its FLOPs: reading, widening to f32, stacking), a divergence entry (the scoring).
 */
interface Rates {
  secondsPerFlop: number;
  secondsPerWeightByte: number;
  secondsPerEntry: number;
}

function predict(work: Work, r: Rates): number {
  return (work.flops + work.expertFlops) * r.secondsPerFlop +
    work.weightBytes * r.secondsPerWeightByte + work.entries * r.secondsPerEntry;
}

function predictGpu(work: Work): number {
  return work.flops / GPU.f32FlopsPerSecond + work.expertFlops / GPU.f32FlopsPerSecond +
    (work.entries * GPU.bytesPerEntry) / GPU.bytesPerSecond;
}

// ---- children: one process a stage group, so peak RSS is its own -----------------------

interface StageRecord {
  stage: string;
  seconds: number;
  peakRssBytes: number;
  /** Bytes read through read() (page cache included), and read from the disk itself. */
  readBytes: number;
  diskReadBytes: number;
  writtenBytes: number;
}

function procIo(): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of Deno.readTextFileSync("/proc/self/io").split("\n")) {
    const [k, v] = line.split(":");
    if (v) out[k.trim()] = Number(v);
  }
  return out;
}

/** Measures a child's stages: time, peak RSS since the last stage (VmHWM, reset), I/O. */
class StageMeter {
  private t = performance.now();
  private io = procIo();
  readonly stages: StageRecord[] = [];
  constructor() {
    this.reset();
  }
  private reset() {
    // Collect the last stage's garbage first (children run with --expose-gc), then reset
    // VmHWM to the current RSS by writing 5 to clear_refs (Linux 4.0+).
    (globalThis as { gc?: () => void }).gc?.();
    try {
      Deno.writeTextFileSync("/proc/self/clear_refs", "5");
    } catch { /* peaks then run from the process start */ }
  }
  take(stage: string) {
    const io = procIo();
    const hwm = /VmHWM:\s+(\d+) kB/.exec(Deno.readTextFileSync("/proc/self/status"))!;
    this.stages.push({
      stage,
      seconds: (performance.now() - this.t) / 1000,
      peakRssBytes: Number(hwm[1]) * 1024,
      readBytes: io.rchar - this.io.rchar,
      diskReadBytes: io.read_bytes - this.io.read_bytes,
      writtenBytes: io.wchar - this.io.wchar,
    });
    this.io = io;
    this.reset();
    this.t = performance.now();
  }
}

async function child(mode: string, arg: Record<string, unknown>): Promise<Record<string, unknown>> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--v8-flags=--expose-gc",
      new URL(import.meta.url).pathname,
      mode,
      JSON.stringify(arg),
    ],
    stderr: "inherit",
  }).output();
  if (!out.success) throw new Error(`scale bench child ${mode} failed (exit ${out.code})`);
  const lines = new TextDecoder().decode(out.stdout).trim().split("\n");
  return JSON.parse(lines.at(-1)!);
}

async function childMain(mode: string, arg: Record<string, unknown>) {
  const meter = new StageMeter();
  let extra: Record<string, unknown> = {};
  if (mode === "synthesize") {
    const config = synthesizedConfig(arg.like as string, arg.layers as number, 0);
    await synthesizeCheckpoint(config, arg.dir as string, { tokenizerDir: DEFAULT_MODEL });
    meter.take("synthesize");
  } else if (mode === "search") {
    const { path, results } = await runSearchJob(arg.settings as SearchSettings, {
      resultsRoot: arg.results as string,
      progress: false,
      fresh: true,
      log: () => {},
      onStage: (stage) => meter.take(stage),
    });
    extra = {
      results: path,
      expertSeconds: Object.fromEntries(
        Object.entries(results.expert_search).map(([l, e]) => [l, {
          seconds: e.seconds,
          outputSeconds: e.outputSeconds,
        }]),
      ),
      cache: results.cache,
    };
  } else if (mode === "condense") {
    const sizes = await condenseFromSearch({
      search: arg.search as string,
      variant: "sr",
      layers: 1,
      maxShardBytes: 1e9,
    }, arg.out as string);
    meter.take("condense");
    extra = { bytesBefore: sizes.bytesBefore, bytesAfter: sizes.bytesAfter };
  } else if (mode === "naive") {
    // A few candidates of the reference procedure, each a full forward per batch.
    const model = await Model.load(arg.model as string, new CpuBackend());
    const tok = await loadTokenizer(arg.model as string);
    const calib = await loadCalibration(DATA, tok, {
      docs: arg.docs as number,
      maxLen: SEQ_LEN,
      bos: "auto",
      bosTokenId: model.spec.bosTokenId,
      batchSize: 8,
    });
    const times: number[] = [];
    const stop = new Error("enough candidates");
    try {
      await expertSearchNaive(model, calib.batches, arg.layer as number, {
        k: arg.k as number,
        metric: "js-hidden",
        avgW: arg.avgW as number[],
        layerwise: true,
        progress: (done) => {
          times.push(performance.now());
          if (done === NAIVE_CANDIDATES) throw stop;
        },
      });
    } catch (e) {
      if (e !== stop) throw e;
    }
    model.close();
    meter.take("naive");
    extra = { secondsPerCandidate: (times.at(-1)! - times[0]) / 1000 / (times.length - 1) };
  } else throw new Error(`unknown scale bench child "${mode}"`);
  console.log(JSON.stringify({ stages: meter.stages, ...extra }));
}

// ---- the bench --------------------------------------------------------------------------

function loadAverage(): number[] {
  return Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).map(Number);
}

/** Run the scale bench; prefixes and runs are kept under `dir` (the prefixes reused). */
export async function benchScale(dir: string): Promise<Record<string, unknown>> {
  await Deno.mkdir(dir, { recursive: true });
  const load = [loadAverage()];
  const runs: Record<string, unknown>[] = [];
  const fits: Record<string, unknown>[] = [];
  let naiveRow: Record<string, unknown> | null = null;
  for (const { like, layers, k } of PREFIXES) {
    const modelDir = `${dir}/${like}-${layers}`;
    const config = synthesizedConfig(like, layers, 0);
    const spec = parseModelConfig(config);
    // The prefix: written once (its stage recorded beside it), then reused.
    const record = `${modelDir}.synthesize.json`;
    let synth: Record<string, unknown>;
    try {
      if (
        await Deno.readTextFile(`${modelDir}/config.json`) !==
          JSON.stringify(config, null, 2) + "\n"
      ) {
        throw new Error("stale");
      }
      synth = JSON.parse(await Deno.readTextFile(record));
    } catch {
      await Deno.remove(modelDir, { recursive: true }).catch(() => {});
      console.error(`scale: synthesizing ${like} (${layers} layers) in ${modelDir} ...`);
      synth = await child("synthesize", { like, layers, dir: modelDir });
      await Deno.writeTextFile(record, JSON.stringify(synth));
    }
    const measured: {
      docs: number;
      stages: StageRecord[];
      expertSeconds: unknown;
      cache: unknown;
      results: string;
    }[] = [];
    for (const docs of SIZES) {
      console.error(`scale: search on ${like} (${layers} layers), ${docs} x ${SEQ_LEN} tokens ...`);
      const spill = `${dir}/spill`;
      await Deno.mkdir(spill, { recursive: true });
      const r = await child("search", {
        settings: {
          model: modelDir,
          data: DATA,
          name: `${like}-${layers}-${docs}`,
          docs,
          maxLen: SEQ_LEN,
          // One pass profiles and caches (the cost model counts SEQ_LEN tokens a document).
          profileMaxLen: SEQ_LEN,
          profile: null,
          batchSize: 8,
          bos: "auto",
          metric: "js-hidden",
          expertMetric: "js-hidden",
          experts: k,
          layers: 1,
          variants: ["sr"],
          naive: false,
          layerwise: true,
          cacheMemory: CACHE_MEMORY,
          spillDir: spill,
        } satisfies SearchSettings,
        results: `${dir}/results`,
      });
      measured.push({ docs, ...(r as Omit<(typeof measured)[number], "docs">) });
    }
    // Condense the larger run's first sr layer.
    const out = `${dir}/condensed-${like}-${layers}`;
    await Deno.remove(out, { recursive: true }).catch(() => {});
    const condense = await child("condense", { search: measured.at(-1)!.results, out });
    await Deno.remove(out, { recursive: true }).catch(() => {});

    // Fit seconds per unit on the smaller size, predict the larger.
    const workOf = (docs: number) => searchWork(spec, docs * SEQ_LEN, k, 1);
    const stageSeconds = (m: (typeof measured)[number]) => {
      const s = Object.fromEntries(m.stages.map((st) => [st.stage, st.seconds]));
      const experts = m.expertSeconds as Record<string, { seconds: number; outputSeconds: number }>;
      const outputs = Object.values(experts).reduce((a, e) => a + e.outputSeconds, 0);
      const expertsTotal = Object.keys(s).filter((k) => k.startsWith("experts "))
        .reduce((a, k) => a + s[k], 0);
      return {
        setup: s.setup,
        profile: s.profile,
        outputs,
        scoring: expertsTotal - outputs,
        layers: s["layers sr"],
      };
    };
    const [small, large] = measured.map(stageSeconds);
    const w = workOf(SIZES[0]);
    const secondsPerFlop = small.outputs / w.experts.expertFlops;
    const rates: Rates = {
      secondsPerFlop,
      secondsPerWeightByte: Math.max(0, small.profile - w.profile.flops * secondsPerFlop) /
        w.profile.weightBytes,
      secondsPerEntry: small.scoring / w.experts.entries,
    };
    const w2 = workOf(SIZES[1]);
    const check = {
      docs: SIZES[1],
      predicted: {
        profile: predict(w2.profile, rates),
        outputs: w2.experts.expertFlops * rates.secondsPerFlop,
        scoring: w2.experts.entries * rates.secondsPerEntry,
        layers: predict(w2.layers, rates),
      },
      measured: large,
    };
    fits.push({ like, layers, k, rates, check });
    runs.push({ like, layers, k, synthesize: synth, search: measured, condense });

    if (like === "deepseek-moe-16b") {
      // The reference procedure on the same layer and tokens as the smaller fast run.
      const l = moeLayers(spec)[0];
      const results = JSON.parse(await Deno.readTextFile(measured[0].results));
      const naive = await child("naive", {
        model: modelDir,
        docs: SIZES[0],
        layer: l,
        k,
        avgW: results.profile.layers[l].avg_w,
      });
      const mlp = spec.layers[l].mlp as { experts: number };
      const candidates = expertCandidateCount(mlp.experts, k);
      const naiveLayer = (naive.secondsPerCandidate as number) * candidates;
      const fastLayer =
        (measured[0].expertSeconds as Record<string, { seconds: number }>)[l].seconds;
      // At full depth a naive candidate is a forward of every layer: add the layers the
      // prefix lacks at the model's cost of a layer (its FLOPs and its weights' loading).
      const full = PUBLISHED[like].config.num_hidden_layers as number;
      const fullSpec = parseModelConfig(PUBLISHED[like].config);
      let missing = 0;
      for (let m = spec.numLayers; m < full; m++) {
        missing += SIZES[0] * SEQ_LEN * layerFlopsPerToken(fullSpec, m, SEQ_LEN) *
            rates.secondsPerFlop + layerBytes(fullSpec, m) * rates.secondsPerWeightByte;
      }
      const naiveFull = ((naive.secondsPerCandidate as number) + missing) * candidates;
      naiveRow = {
        layer: l,
        docs: SIZES[0],
        tokens: SIZES[0] * SEQ_LEN,
        candidates,
        naiveCandidatesTimed: NAIVE_CANDIDATES,
        naiveSecondsPerCandidate: naive.secondsPerCandidate,
        naiveLayerSeconds: naiveLayer,
        fastLayerSeconds: fastLayer,
        ratioAtPrefix: naiveLayer / fastLayer,
        naiveLayerSecondsAtFullDepth: naiveFull,
        ratioAtFullDepth: naiveFull / fastLayer,
        naiveStages: naive.stages,
      };
    }
  }

  // Projections: the paper's settings from the fitted rates of the same architecture's
  // prefix (Qwen1.5-MoE from DeepSeekMoE's: same hidden size, expert width and kernels).
  const projections = PAPER.map((p) => {
    const spec = parseModelConfig(PUBLISHED[p.like].config);
    const fit = (fits.find((f) =>
      f.like === p.like
    ) ?? fits.find((f) => f.like === "deepseek-moe-16b"))!;
    const rates = fit.rates as Rates;
    const tokens = p.docs * SEQ_LEN;
    const work = searchWork(spec, tokens, p.k, p.n);
    const cpu = {
      profile: predict(work.profile, rates),
      expertSearch: predict(work.experts, rates),
      layerSearch: predict(work.layers, rates),
    };
    // The GPU holds the whole model (bf16) and reads it once.
    const gpu = {
      readWeights: modelBytes(spec) / GPU.diskBytesPerSecond,
      profile: predictGpu(work.profile),
      expertSearch: predictGpu(work.experts),
      layerSearch: predictGpu(work.layers),
    };
    const H = spec.hidden, moe = moeLayers(spec);
    const mlp = spec.layers[moe[0]].mlp as { experts: number };
    return {
      ...p,
      tokens,
      ratesFrom: fit.like,
      layerSearchCandidates: work.candidates,
      work,
      thisMachineSeconds: { ...cpu, total: cpu.profile + cpu.expertSearch + cpu.layerSearch },
      // Layer-wise on this machine every layer forward reads its layer: the model does not
      // fit in the page cache, so those bytes come from the disk (seconds at 1 GB/s).
      thisMachineWeightReadBytes: work.profile.weightBytes + work.experts.weightBytes +
        work.layers.weightBytes,
      gpuSeconds: {
        ...gpu,
        total: gpu.readWeights + gpu.profile + gpu.expertSearch + gpu.layerSearch,
      },
      expertOutputsBytesPerLayer: mlp.experts * tokens * H * 4,
      activationBytes: tokens * H * 4,
    };
  });
  load.push(loadAverage());
  return { gpu: GPU, loadAverage: load, runs, fits, naiveVsFast: naiveRow, projections };
}

/** The section of scripts/bench.ts (`--only scale`); its prefixes live in results/tmp/scale-bench. */
export const scaleSection: BenchSection = {
  name: "scale",
  run: async () => ({
    scale: await benchScale(`${ROOT}results/tmp/scale-bench`),
  }),
};

if (import.meta.main) await childMain(Deno.args[0], JSON.parse(Deno.args[1]));
