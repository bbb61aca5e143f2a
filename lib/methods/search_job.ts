// The CD-MoE main job: routing profile -> greedy expert selection per MoE layer ->
// greedy layer search per variant, resumable from a state file written atomically
// after every finished step, ending in one versioned results JSON.

import { CpuBackend } from "../backend/cpu.ts";
import type { Backend } from "../backend/backend.ts";
import {
  hashFile,
  hashModelFolder,
  readResults,
  resultsHeader,
  resultsPath,
  writeJsonAtomic,
} from "../io/results.ts";
import { loadTokenizer } from "../io/tokenizer.ts";
import { moeLayers } from "../model/config.ts";
import { forward } from "../model/decoder.ts";
import { Model } from "../model/model.ts";
import { type BosMode, loadCalibration } from "./calibration.ts";
import { Progress, UsageError } from "./cli.ts";
import { type Metric, onHidden } from "./divergence.ts";
import { planSize, planTensors } from "./condense.ts";
import {
  expertCandidateCount,
  expertSearchFast,
  expertSearchNaive,
  type ExpertSearchResult,
} from "./expert_search.ts";
import { calibrationPass, type LayerCache } from "./layer_cache.ts";
import { ActivationStore } from "./activations.ts";
import {
  finalReference,
  layerCandidateCount,
  layerSearchFast,
  layerSearchNaive,
  type LayerStep,
  planOf,
  type Variant,
} from "./layer_search.ts";
import { Reference } from "./divergence.ts";
import { type LayerChange, moeSpec } from "./plan.ts";
import {
  type ProfileData,
  readProfileFile,
  type RoutingProfile,
  RoutingProfiler,
} from "./routing_profile.ts";
import { type ExpertSaliency, SaliencyRecorder } from "./expert_saliency.ts";

export const SEARCH_SCHEMA = 1;
export const SEARCH_KIND = "cdmoe-search";
export const STATE_KIND = "cdmoe-search-state";

export interface SearchSettings {
  model: string;
  data: string;
  name: string;
  docs: number;
  /** Tokens per document in the searches, BOS included. */
  maxLen: number;
  /**
   * Tokens per document in the routing profile (null: full length, capped at the model's
   * max_position_embeddings; the release profiles whole documents).
   */
  profileMaxLen: number | null;
  /** A routing profile written by scripts/profile_routing.ts, used instead of profiling. */
  profile: string | null;
  batchSize: number;
  bos: BosMode;
  /** Layer-search metric. */
  metric: Metric;
  /** Expert-search metric (on decoder-layer outputs: js-hidden or cosine). */
  expertMetric: Metric;
  /** Experts kept per condensed layer for variant sr (null: the model's top-k). */
  experts: number | null;
  /** Layer-search steps (null: all MoE layers). */
  layers: number | null;
  variants: Variant[];
  naive: boolean;
  layerwise: boolean;
  /**
   * Bytes of cached activations kept in memory before the rest spills to disk (memory
   * only, like layerwise; default: DEFAULT_CACHE_MEMORY with layerwise, else no limit).
   */
  cacheMemory?: number;
  /** Where spilled activations go (default: the system's temp folder). */
  spillDir?: string;
}

/** The cache's memory budget with --layerwise: spilling beyond it costs little (docs/scale.md). */
export const DEFAULT_CACHE_MEMORY = 2 ** 30;

export interface SizeInfo {
  params: number;
  bytes: number;
}

export interface VariantResult {
  variant: Variant;
  order: number[];
  steps: (LayerStep & SizeInfo & { seconds?: number })[];
  seconds: number;
}

interface State {
  identity: Record<string, unknown>;
  profile?: RoutingProfile;
  profile_data?: ProfileData;
  profile_seconds?: number;
  /** Expert pruning's criteria, from the profile pass (a state from before has none). */
  saliency?: ExpertSaliency;
  experts: Record<string, ExpertSearchResult>;
  variants: Record<string, VariantResult>;
}

export interface JobOptions {
  resultsRoot?: string;
  /** Ignore (and overwrite) an existing state file. */
  fresh?: boolean;
  backend?: Backend;
  log?: (line: string) => void;
  /** Show progress lines on stderr. */
  progress?: boolean;
  /**
   * Called when a stage ends: "setup" (model hash, calibration tokens, state), "profile",
   * "cache" (the searches' pass, where the profile had its own), "experts <l>", "layers
   * <variant>" (the scale bench measures each stage's time and memory from here).
   */
  onStage?: (stage: string) => void | Promise<void>;
}

/** Validate, run (or resume) the job, and write the results file; returns the results object. */
export async function runSearchJob(settings: SearchSettings, opts: JobOptions = {}) {
  const t0 = performance.now();
  const root = opts.resultsRoot ?? "results";
  const log = opts.log ?? ((s: string) => console.error(s));
  const model = await Model.load(settings.model, opts.backend ?? new CpuBackend());
  const budget = settings.cacheMemory ?? (settings.layerwise ? DEFAULT_CACHE_MEMORY : Infinity);
  const store = new ActivationStore(budget, settings.spillDir);
  try {
    return await runLoaded(model, settings, root, { ...opts, store }, log, t0);
  } finally {
    store.close();
    model.close();
  }
}

function validate(model: Model, s: SearchSettings): { moe: number[]; k: number; n: number } {
  const cfg = `${s.model}/config.json`;
  const moe = moeLayers(model.spec);
  if (moe.length === 0) throw new UsageError(`${cfg}: the model has no MoE layers to condense`);
  const minExperts = Math.min(...moe.map((l) => moeSpec(model, l).experts));
  const k = s.experts ?? moeSpec(model, moe[0]).topK;
  if (k > minExperts) {
    throw new UsageError(
      `--experts ${k} is larger than the number of routed experts (${minExperts}) in ${cfg}`,
    );
  }
  const n = s.layers ?? moe.length;
  if (n > moe.length) {
    throw new UsageError(`--layers ${n} is larger than the ${moe.length} MoE layers in ${cfg}`);
  }
  if (!onHidden(s.expertMetric)) {
    throw new UsageError(
      `--expert-metric ${s.expertMetric}: expert selection compares decoder-layer outputs, ` +
        `use js-hidden or cosine`,
    );
  }
  return { moe, k, n };
}

async function runLoaded(
  model: Model,
  s: SearchSettings,
  root: string,
  opts: JobOptions & { store: ActivationStore },
  log: (line: string) => void,
  t0: number,
) {
  const { moe, k, n } = validate(model, s);
  const tok = await loadTokenizer(s.model);
  const calib = await loadCalibration(s.data, tok, {
    docs: s.docs,
    maxLen: s.maxLen,
    bos: s.bos,
    bosTokenId: model.spec.bosTokenId,
    batchSize: s.batchSize,
  });
  const modelHash = await hashModelFolder(s.model);
  // A profile from a file: checked before anything runs or is written.
  const fromFile = s.profile === null ? null : await readProfileFile(s.profile, {
    modelHash,
    dataSha256: calib.sha256,
    moeLayers: new Map(moe.map((l) => [l, moeSpec(model, l).experts])),
  });
  const {
    layerwise: _memoryOnly,
    cacheMemory: _memory,
    spillDir: _where,
    variants: _independent,
    ...resultSettings
  } = s;
  // What the finished steps depend on. Not --layerwise (memory only) and not --variant:
  // variants share the profile and expert search and are searched independently, so a
  // rerun may add variants to a state.
  const identity = {
    model_hash: modelHash,
    data_sha256: calib.sha256,
    settings: { ...resultSettings, experts: k, layers: n },
    ...(s.profile === null ? {} : { profile_sha256: await hashFile(s.profile) }),
  };

  // Resume: same identity only.
  const statePath = `${root}/search/${s.name}.state.json`;
  let state: State = { identity, experts: {}, variants: {} };
  if (!opts.fresh) {
    let exists = true;
    try {
      await Deno.stat(statePath);
    } catch {
      exists = false;
    }
    if (exists) {
      const old = await readResults(statePath, STATE_KIND, SEARCH_SCHEMA) as unknown as State;
      if (JSON.stringify(old.identity) !== JSON.stringify(identity)) {
        throw new UsageError(
          `${statePath}: state was written for different settings, model or data; refusing ` +
            `to resume (use --fresh to start over, or another --name)`,
        );
      }
      state = old;
      log(`resuming from ${statePath}`);
    }
  }
  const save = async () =>
    writeJsonAtomic(statePath, { ...await resultsHeader(STATE_KIND, SEARCH_SCHEMA), ...state });

  const show = opts.progress ?? true;
  const bar = (what: string, total: number, unit: string, from = 0) => {
    const p = new Progress(what, total, unit, from);
    return (done: number, units?: number) => show && p.update(done, units);
  };
  log(
    `model ${s.model}: ${moe.length} MoE layers; calibration ${calib.docs} docs, ` +
      `${calib.tokens} tokens (${calib.batches.length} batches); metric ${s.metric}, ` +
      `expert metric ${s.expertMetric}, k=${k}, n=${n}, variants ${s.variants.join(",")}` +
      (s.naive ? ", NAIVE reference mode" : ""),
  );

  await opts.onStage?.("setup");

  // 1. Profile (and, in fast mode, the layer cache every later step reuses). As the
  // release, the profile sees the calibration documents at full length (capped at the
  // model's context) and only the searches truncate; with equal lengths one pass does both.
  let cache: LayerCache | null = null;
  const expertsLeft = s.variants.includes("sr") && k > 0 && moe.some((l) => !state.experts[l]);
  const layersLeft = s.variants.some((v) => (state.variants[v]?.steps.length ?? 0) < n);
  const needCache = !s.naive && (expertsLeft || layersLeft);
  const L = model.spec.numLayers, profileLen = s.profileMaxLen ?? model.spec.maxPositions;
  const profileData = (c: { docs: number; tokens: number }): ProfileData => ({
    file: null,
    docs: c.docs,
    tokens: c.tokens,
    max_len: profileLen,
    full_length: s.profileMaxLen === null,
  });
  // A state written before saliency was recorded profiles again, recording both.
  if (state.profile && !state.saliency && !state.profile_data?.file) delete state.profile;
  if (!state.profile && fromFile) {
    state.profile = fromFile.profile;
    state.profile_data = fromFile.data;
    state.saliency = fromFile.saliency; // absent in a profile written before saliency was
    await save();
  }
  if (!state.profile && profileLen !== s.maxLen) {
    const tp = performance.now();
    const pcalib = await loadCalibration(s.data, tok, {
      docs: s.docs,
      maxLen: profileLen,
      bos: s.bos,
      bosTokenId: model.spec.bosTokenId,
      batchSize: s.batchSize,
    });
    log(`profile: ${pcalib.docs} docs, ${pcalib.tokens} tokens (up to ${profileLen} a document)`);
    const profiler = new RoutingProfiler(), saliency = new SaliencyRecorder();
    const p = bar("profile", L, "tokens");
    await calibrationPass(model, pcalib.batches, profiler, {
      layerwise: s.layerwise,
      keepCache: false,
      progress: (done) => p(done, (done * pcalib.tokens) / L),
      onMoe: (l, xn, routing) => saliency.observe(model, l, xn, routing),
    });
    state.profile = profiler.result();
    state.saliency = saliency.result();
    state.profile_data = profileData(pcalib);
    state.profile_seconds = (performance.now() - tp) / 1000;
    await save();
    await opts.onStage?.("profile");
  }
  if (!state.profile || needCache) {
    const tp = performance.now();
    // Saliency is recorded in the pass that records the profile (expert pruning's criteria).
    const profiler = state.profile ? null : new RoutingProfiler();
    const saliency = profiler ? new SaliencyRecorder() : null;
    const p = bar(profiler ? "profile" : "cache", L, "tokens");
    cache = await calibrationPass(model, calib.batches, profiler, {
      layerwise: s.layerwise,
      store: opts.store,
      keepCache: needCache,
      progress: (done) => p(done, (done * calib.tokens) / L),
      onMoe: saliency ? (l, xn, routing) => saliency.observe(model, l, xn, routing) : undefined,
    });
    if (profiler) {
      state.saliency = saliency!.result();
      state.profile = profiler.result();
      state.profile_data = profileData(calib);
      state.profile_seconds = (performance.now() - tp) / 1000;
    }
    await save();
    if (!needCache) cache = null;
    await opts.onStage?.(profiler ? "profile" : "cache");
  }
  const avgW = (l: number) => state.profile!.layers[l].avg_w;

  // 2. Greedy expert selection per MoE layer (needed by sr with k > 0).
  if (s.variants.includes("sr") && k > 0) {
    const todo = moe.filter((l) => !state.experts[l]);
    const total = todo.reduce((a, l) => a + expertCandidateCount(moeSpec(model, l).experts, k), 0);
    const p = bar("expert search", total, "candidates");
    let before = 0;
    for (const l of todo) {
      const outputs = bar(`expert outputs, layer ${l}`, moeSpec(model, l).experts, "experts");
      const o = {
        k,
        metric: s.expertMetric,
        avgW: avgW(l),
        layerwise: s.layerwise,
        progress: (d: number) => p(before + d),
        outputsProgress: (d: number) => outputs(d),
      };
      state.experts[l] = s.naive
        ? await expertSearchNaive(model, calib.batches, l, o)
        : await expertSearchFast(model, cache!, l, o);
      before += expertCandidateCount(moeSpec(model, l).experts, k);
      await save();
      await opts.onStage?.(`experts ${l}`);
    }
  }

  // 3. Greedy layer search per variant.
  let ref: Reference | null = null;
  for (const variant of s.variants) {
    const prior = state.variants[variant];
    if (prior && prior.steps.length === n) continue;
    if (!ref) {
      const finalHidden = cache ? cache.finalHidden : await naiveFinalHidden(model, calib, s);
      ref = await finalReference(model, calib.batches, finalHidden, s.metric);
    }
    const changeFor = changeForVariant(variant, k, state);
    const tv = performance.now();
    let tStep = performance.now();
    const result: VariantResult = prior ?? { variant, order: [], steps: [], seconds: 0 };
    const resumed = layerCandidateCount(moe.length, result.steps.length);
    const p = bar(
      `layer search ${variant}`,
      layerCandidateCount(moe.length, n),
      "candidates",
      resumed,
    );
    const lo = {
      layers: moe,
      n,
      metric: s.metric,
      changeFor,
      layerwise: s.layerwise,
      // A copy: onStep appends to result.steps while the search keeps its own list.
      done: [...result.steps],
      progress: p,
      onStep: async (step: LayerStep) => {
        const size = planSize(planTensors(model, planOf([...result.order, step.layer], changeFor)));
        result.steps.push({ ...step, ...size, seconds: (performance.now() - tStep) / 1000 });
        result.order.push(step.layer);
        result.seconds += (performance.now() - tStep) / 1000;
        tStep = performance.now();
        state.variants[variant] = result;
        await save();
      },
    };
    if (s.naive) await layerSearchNaive(model, calib.batches, ref, lo);
    else await layerSearchFast(model, cache!, ref, lo);
    await opts.onStage?.(`layers ${variant}`);
    log(`layer search ${variant}: ${((performance.now() - tv) / 1000).toFixed(1)} s`);
  }

  const original = planSize(planTensors(model, new Map()));
  const results = {
    ...await resultsHeader(SEARCH_KIND, SEARCH_SCHEMA),
    model: { path: s.model, hash: modelHash, ...original },
    data: {
      path: s.data,
      sha256: calib.sha256,
      docs: calib.docs,
      tokens: calib.tokens,
      bos: calib.bos,
      profile: state.profile_data,
    },
    settings: { ...identity.settings, variants: s.variants, layerwise: s.layerwise },
    notes: {
      routing_weight: "avg_w = mean over selecting tokens of the weight the model uses " +
        "(raw softmax prob; renormalised over top-k only when the config normalises)",
      profile: "routing profile over the calibration documents at full length (capped at " +
        "max_position_embeddings) unless data.profile says otherwise; the searches truncate",
      expert_search: "divergence of HF hidden_states[l + 1]: decoder layer l's output " +
        "(residual stream), after the final norm for the last decoder layer",
      layer_search: onHidden(s.metric)
        ? "divergence of the final hidden state after the final norm"
        : "divergence on logits",
      qwen: model.spec.modelType === "qwen2_moe"
        ? "condensed Qwen layers keep the sigmoid-gated shared expert (gated_shared)"
        : undefined,
    },
    profile: state.profile,
    profile_seconds: state.profile_seconds,
    saliency: state.saliency,
    expert_search: state.experts,
    // Every variant the state has finished (a rerun that adds a variant keeps the others).
    layer_search: state.variants,
    // This run's cached activations: the memory budget, and what went past it to disk.
    cache: {
      memory_budget_bytes: Number.isFinite(opts.store.budgetBytes) ? opts.store.budgetBytes : null,
      peak_memory_bytes: opts.store.stats.peakMemoryBytes,
      spilled_bytes: opts.store.stats.spilledBytes,
      spill_read_bytes: opts.store.stats.readBytes,
    },
    wall_seconds: (performance.now() - t0) / 1000,
  };
  const out = resultsPath(root, "search", s.name);
  await writeJsonAtomic(out, results);
  log(formatTable(results.layer_search, original));
  log(`wrote ${out}`);
  return { path: out, results };
}

function changeForVariant(variant: Variant, k: number, state: State) {
  return (l: number): LayerChange => {
    if (variant === "layerdrop") return { kind: "layerdrop" };
    if (variant === "blockdrop") return { kind: "blockdrop" };
    if (variant === "s" || k === 0) return { kind: "condense", experts: [], wbar: [] };
    const e = state.experts[l];
    return { kind: "condense", experts: e.order.slice(0, k), wbar: e.wbar.slice(0, k) };
  };
}

/** Naive mode's reference: the final normed hidden state from a plain forward. */
async function naiveFinalHidden(
  model: Model,
  calib: { batches: { ids: Int32Array; shape: { batch: number; seqLen: number } }[] },
  s: SearchSettings,
): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (const b of calib.batches) {
    const r = await forward(model, b.ids, b.shape, { collectHidden: true, layerwise: s.layerwise });
    out.push(r.hiddenStates![r.hiddenStates!.length - 1]);
  }
  return out;
}

export function formatTable(variants: Record<string, VariantResult>, original: SizeInfo): string {
  const lines: string[] = [];
  for (const v of Object.values(variants)) {
    lines.push(`\nvariant ${v.variant}`);
    lines.push("step  layer   divergence       params   params%        bytes   bytes%");
    lines.push(
      `${"0".padStart(4)}  ${"-".padStart(5)}  ${(0).toExponential(4).padStart(11)}  ` +
        `${String(original.params).padStart(11)}  ${"100.0".padStart(8)}  ` +
        `${String(original.bytes).padStart(11)}  ${"100.0".padStart(7)}`,
    );
    for (const st of v.steps) {
      lines.push(
        `${String(st.step).padStart(4)}  ${String(st.layer).padStart(5)}  ` +
          `${st.divergence.toExponential(4).padStart(11)}  ${String(st.params).padStart(11)}  ` +
          `${(100 * st.params / original.params).toFixed(1).padStart(8)}  ` +
          `${String(st.bytes).padStart(11)}  ${
            (100 * st.bytes / original.bytes).toFixed(1).padStart(7)
          }`,
      );
    }
  }
  return lines.join("\n");
}
