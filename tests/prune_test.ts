// Expert pruning: the saliency recorded in the profile pass equals a plain per-expert
// computation; a pruned checkpoint reloads as an ordinary model of the same architecture
// and computes what the original computes with the pruned experts masked out of routing
// (router logits -inf before the softmax); condensing and pruning combine; bad input is a
// clear error with nothing written.

import assert from "node:assert";
import type { Routing, Tensor } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { hashModelFolder } from "../lib/io/results.ts";
import { SafetensorsFile } from "../lib/io/safetensors.ts";
import { expertName, moeLayers, routerName } from "../lib/model/config.ts";
import { forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import type { CalibrationBatch } from "../lib/methods/calibration.ts";
import { writeCondensedCheckpoint } from "../lib/methods/condense.ts";
import {
  CRITERIA,
  type Criterion,
  type ExpertSaliency,
  mostSalient,
  SaliencyRecorder,
} from "../lib/methods/expert_saliency.ts";
import { calibrationPass } from "../lib/methods/layer_cache.ts";
import { expertOutput, moeSpec, sharedOutput } from "../lib/methods/plan.ts";
import { pruneFromFile } from "../lib/methods/prune_job.ts";
import { RoutingProfiler } from "../lib/methods/routing_profile.ts";
import { runSearchJob } from "../lib/methods/search_job.ts";
import { DEFAULT_CALIBRATION } from "../lib/methods/calibration.ts";
import { DEFAULT_MODEL, FIXTURE_ROOT } from "./golden.ts";
import { maxRelError } from "./util.ts";

const PRUNE = new URL("../scripts/prune.ts", import.meta.url).pathname;

function batches(vocab: number, seed: number): CalibrationBatch[] {
  const shape = { batch: 2, seqLen: 16 };
  const ids = Int32Array.from(
    { length: shape.batch * shape.seqLen },
    (_, i) => (i * 7919 + seed * 131) % Math.min(vocab, 256),
  );
  return [{ ids, shape, docIndex: [0, 1] }];
}

/** Saliency of `dir` on a fixed batch, written as a routing-profile results file. */
async function writeProfile(dir: string, path: string): Promise<ExpertSaliency> {
  const model = await Model.load(dir, new CpuBackend());
  const recorder = new SaliencyRecorder(), profiler = new RoutingProfiler();
  await calibrationPass(model, batches(model.spec.vocab, 1), profiler, {
    keepCache: false,
    onMoe: (l, xn, routing) => recorder.observe(model, l, xn, routing),
  });
  model.close();
  const saliency = recorder.result();
  await Deno.writeTextFile(
    path,
    JSON.stringify({
      kind: "routing-profile",
      schema_version: 1,
      model: { path: dir, hash: await hashModelFolder(dir) },
      profile: profiler.result(),
      saliency,
    }),
  );
  return saliency;
}

/**
 * The original model's logits with every layer in `kept` routing only among its kept
 * experts: router logits of the others set to -inf before the softmax, so the softmax
 * renormalises over the kept experts, as it does in the pruned model.
 */
async function maskedLogits(
  model: Model,
  ids: Int32Array,
  kept: Map<number, number[]>,
  route: (l: number) => { k: number; normalize: boolean; eps: number },
): Promise<Float32Array> {
  const be = model.backend, shape = { batch: 1, seqLen: ids.length };
  const mlpOverride = async (l: number, xn: Tensor) => {
    const keep = kept.get(l);
    if (!keep) return undefined;
    const E = moeSpec(model, l).experts, n = xn.shape[0];
    const raw = be.matmul(xn, await model.weight(routerName(model.spec, l)));
    const ls = (await be.read(raw)).slice();
    be.free(raw);
    for (let r = 0; r < n; r++) {
      for (let e = 0; e < E; e++) if (!keep.includes(e)) ls[r * E + e] = -Infinity;
    }
    const logits = be.tensor(ls, [n, E]);
    const out = await sharedOutput(model, l, xn);
    const stacks = {
      gateUp: await model.expertStack(l, "gate_up", E),
      down: await model.expertStack(l, "down", E),
    };
    await be.routedExperts(xn, logits, stacks, route(l), out);
    be.free(logits);
    return out;
  };
  return (await forward(model, ids, shape, { mlpOverride })).logits;
}

const EXPERTS_KEY: Record<string, string> = {
  deepseek: "n_routed_experts",
  qwen2_moe: "num_experts",
  olmoe: "num_experts",
  mixtral: "num_local_experts",
};

async function checkPruned(dir: string, criterion: Criterion, ratio: number, topK?: number) {
  const root = await Deno.makeTempDir();
  try {
    const profile = `${root}/profile.json`;
    const saliency = await writeProfile(dir, profile);
    const out = `${root}/pruned`;
    const r = await pruneFromFile(
      { source: { kind: "profile", path: profile }, criterion, ratio, topK },
      out,
    );
    assert(r.bytesAfter < r.bytesBefore, `${dir}: ${r.bytesAfter} >= ${r.bytesBefore}`);
    const src = await Model.load(dir, new CpuBackend());
    const pruned = await Model.load(out, new CpuBackend());
    const E = r.experts, keep = E - Math.floor(ratio * E);
    // An ordinary config: the architecture's own key says fewer experts.
    const cfg = pruned.ckpt.config;
    assert.strictEqual(cfg.model_type, src.ckpt.config.model_type);
    assert.strictEqual(cfg[EXPERTS_KEY[src.spec.modelType]], keep, dir);
    for (const k of Object.values(EXPERTS_KEY)) {
      if (k !== EXPERTS_KEY[src.spec.modelType]) assert(!(k in cfg) || k in src.ckpt.config, k);
    }
    for (const l of moeLayers(src.spec)) {
      const mlp = moeSpec(pruned, l);
      assert.strictEqual(mlp.experts, keep);
      assert.strictEqual(mlp.topK, topK ?? moeSpec(src, l).topK);
      // The most salient experts, renumbered in order; router rows copied.
      const want = mostSalient(
        criterion === "frequency"
          ? saliency.layers[l].freq
          : saliency.layers[l][criterion as Exclude<Criterion, "frequency">],
        keep,
      );
      assert.deepStrictEqual(r.pruning.kept.get(l), want);
      assert(pruned.has(expertName(pruned.spec, l, keep - 1, "down")));
      assert(!pruned.has(expertName(pruned.spec, l, keep, "down")));
      const routerIn = await src.rawTensor(routerName(src.spec, l));
      const routerOut = await pruned.rawTensor(routerName(src.spec, l));
      const rowBytes = routerIn.bytes.length / E;
      want.forEach((e, i) =>
        assert.deepStrictEqual(
          routerOut.bytes.subarray(i * rowBytes, (i + 1) * rowBytes),
          routerIn.bytes.subarray(e * rowBytes, (e + 1) * rowBytes),
        )
      );
      const a = await src.rawTensor(expertName(src.spec, l, want[keep - 1], "gate"));
      const b = await pruned.rawTensor(expertName(src.spec, l, keep - 1, "gate"));
      assert.strictEqual(b.dtype, a.dtype);
      assert.deepStrictEqual(b.bytes, a.bytes);
    }
    const ids = Int32Array.from({ length: 12 }, (_, i) => (i * 37 + 5) % 256);
    const got = (await forward(pruned, ids, { batch: 1, seqLen: ids.length })).logits;
    const want = await maskedLogits(src, ids, r.pruning.kept, (l) => {
      const mlp = moeSpec(pruned, l);
      return { k: mlp.topK, normalize: mlp.renorm.normalize, eps: mlp.renorm.eps };
    });
    // Equal up to f32 rounding: BLAS may sum the router's product over fewer columns in
    // another order (measured: 0 on the fixtures, up to 9e-7 on the default model).
    const err = maxRelError(got, want);
    assert(err <= 1e-5, `${dir} ${criterion} ${ratio}: pruned vs masked ${err}`);
    // And pruning did change the model.
    const original = (await forward(src, ids, { batch: 1, seqLen: ids.length })).logits;
    assert(maxRelError(got, original) > 1e-4, `${dir}: pruning changed nothing`);
    src.close(), pruned.close();
    return { err, r };
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

for (const fixture of ["deepseek-a", "qwen2_moe-a", "olmoe-a", "mixtral-a", "qwen2_moe-bf16"]) {
  Deno.test(`pruned checkpoint = masked routing: ${fixture}`, async () => {
    const criterion = CRITERIA[fixture.length % CRITERIA.length];
    await checkPruned(`${FIXTURE_ROOT}${fixture}`, criterion, 0.5);
  });
}

Deno.test("pruned checkpoint = masked routing: every criterion, --top-k (default model, bf16)", async () => {
  for (const criterion of CRITERIA) await checkPruned(DEFAULT_MODEL, criterion, 0.25);
  await checkPruned(DEFAULT_MODEL, "reap", 0.75, 2);
  await checkPruned(`${FIXTURE_ROOT}mixtral-bf16`, "reap", 0.5, 1);
});

Deno.test("saliency = per-expert reference (all experts on all tokens, picked)", async () => {
  for (const fixture of ["deepseek-a", "qwen2_moe-bf16", "mixtral-a"]) {
    const model = await Model.load(`${FIXTURE_ROOT}${fixture}`, new CpuBackend());
    const recorder = new SaliencyRecorder(), profiler = new RoutingProfiler();
    const want = new Map<number, { freq: number[]; w: number[]; n: number[]; r: number[] }>();
    const reference = async (l: number, xn: Tensor, routing: Routing) => {
      const { experts: E, topK: k } = moeSpec(model, l), H = model.spec.hidden;
      const zeros = () => Array<number>(E).fill(0);
      const sums = { freq: zeros(), w: zeros(), n: zeros(), r: zeros() };
      for (let e = 0; e < E; e++) {
        const y = await model.backend.read(await expertOutput(model, l, e, xn));
        routing.indices.forEach((ex, i) => {
          if (ex !== e) return;
          const t = Math.floor(i / k), g = routing.weights[i];
          let ss = 0;
          for (let h = 0; h < H; h++) ss += y[t * H + h] ** 2;
          sums.freq[e]++,
            sums.w[e] += g,
            sums.n[e] += Math.sqrt(ss),
            sums.r[e] += g * Math.sqrt(ss);
        });
      }
      want.set(l, sums);
    };
    await calibrationPass(model, batches(model.spec.vocab, 2), profiler, {
      keepCache: false,
      onMoe: async (l, xn, routing) => {
        await recorder.observe(model, l, xn, routing);
        await reference(l, xn, routing);
      },
    });
    const got = recorder.result(), profile = profiler.result();
    for (const [l, s] of want) {
      const g = got.layers[l],
        mean = (xs: number[]) => xs.map((x, e) => s.freq[e] ? x / s.freq[e] : 0);
      assert.deepStrictEqual(g.freq, s.freq);
      assert.deepStrictEqual(g.freq, profile.layers[l].freq);
      assert(maxRelError(g.weight, profile.layers[l].avg_w) < 1e-12, `${fixture} weight`);
      assert(maxRelError(g.weight, mean(s.w)) < 1e-12, `${fixture} weight`);
      assert(
        maxRelError(g.norm, mean(s.n)) < 1e-5,
        `${fixture} norm ${maxRelError(g.norm, mean(s.n))}`,
      );
      assert(maxRelError(g.reap, mean(s.r)) < 1e-5, `${fixture} reap`);
      assert(g.freq.some((f) => f === 0) ? g.reap[g.freq.indexOf(0)] === 0 : true);
    }
    model.close();
  }
});

Deno.test("condense then prune: the MoE layers left lose experts, condensed ones stay", async () => {
  const root = await Deno.makeTempDir();
  try {
    const dir = `${FIXTURE_ROOT}deepseek-a`;
    const profile = `${root}/profile.json`;
    await writeProfile(dir, profile);
    const src = await Model.load(dir, new CpuBackend());
    const condensed = `${root}/condensed`;
    await writeCondensedCheckpoint(
      src,
      new Map([[2, { kind: "condense", experts: [3, 7], wbar: [0.2, 0.3] }]]),
      condensed,
      {
        source: dir,
        source_hash: await hashModelFolder(dir),
        search: null,
        variant: "sr",
        num_changed: 1,
      },
    );
    src.close();
    const out = `${root}/both`;
    const r = await pruneFromFile({
      source: { kind: "profile", path: profile },
      model: condensed,
      criterion: "reap",
      keep: 6,
    }, out);
    assert.deepStrictEqual([...r.pruning.kept.keys()], [1, 3]);
    const both = await Model.load(out, new CpuBackend());
    assert.strictEqual(both.spec.layers[2].mlp.kind, "dense");
    assert.strictEqual(moeSpec(both, 1).experts, 6);
    assert.strictEqual(moeSpec(both, 3).experts, 6);
    assert(both.ckpt.config.cdmoe && both.ckpt.config.expert_pruning);
    const ids = Int32Array.from({ length: 12 }, (_, i) => (i * 37 + 5) % 256);
    const got = (await forward(both, ids, { batch: 1, seqLen: ids.length })).logits;
    const cond = await Model.load(condensed, new CpuBackend());
    const want = await maskedLogits(cond, ids, r.pruning.kept, (l) => {
      const mlp = moeSpec(cond, l);
      return { k: mlp.topK, normalize: mlp.renorm.normalize, eps: mlp.renorm.eps };
    });
    assert(maxRelError(got, want) <= 1e-5, `${maxRelError(got, want)}`);
    both.close(), cond.close();
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("--search: the search's profile pass records saliency, also on resuming an older state", async () => {
  const root = await Deno.makeTempDir();
  try {
    const settings = {
      model: DEFAULT_MODEL.replace(/\/+$/, ""),
      data: DEFAULT_CALIBRATION,
      name: "tiny",
      docs: 2,
      maxLen: 12,
      profileMaxLen: null,
      profile: null,
      batchSize: 2,
      bos: "auto" as const,
      metric: "js-hidden" as const,
      expertMetric: "js-hidden" as const,
      experts: 1,
      layers: 1,
      variants: ["layerdrop" as const],
      naive: false,
      layerwise: false,
    };
    const opts = { resultsRoot: root, progress: false, log: () => {} };
    const first = await runSearchJob(settings, opts);
    const saliency = first.results.saliency as ExpertSaliency;
    assert.strictEqual(Object.keys(saliency.layers).length, 5);
    // A state written before saliency was recorded gets it on the next run.
    const statePath = `${root}/search/tiny.state.json`;
    const state = JSON.parse(await Deno.readTextFile(statePath));
    delete state.saliency;
    await Deno.writeTextFile(statePath, JSON.stringify(state));
    const second = await runSearchJob(settings, opts);
    assert.deepStrictEqual(second.results.saliency, saliency);
    assert.deepStrictEqual(second.results.profile, first.results.profile);
    const r = await pruneFromFile({
      source: { kind: "search", path: second.path },
      criterion: "reap",
      ratio: 0.5,
    }, `${root}/pruned`);
    assert.deepStrictEqual(
      r.pruning.kept.get(3),
      mostSalient(saliency.layers[3].reap, 8),
    );
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

async function run(args: string[], script = PRUNE) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stderr: text(out.stderr), stdout: text(out.stdout) };
}

Deno.test("prune and tables have --help naming the pruning flags", async () => {
  const prune = await run(["--help"]);
  assert.strictEqual(prune.code, 0);
  assert.match(prune.stdout, /Usage: deno task prune[^]*--criterion[^]*--top-k/);
  const tables = await run(["--help"], new URL("../scripts/tables.ts", import.meta.url).pathname);
  assert.strictEqual(tables.code, 0);
  assert.match(tables.stdout, /--prune-criteria[^]*--prune-ratios[^]*--combine-layers/);
});

Deno.test("prune CLI: writes the folder and a versioned record; bad input writes nothing", async () => {
  const root = await Deno.makeTempDir();
  try {
    const dir = `${FIXTURE_ROOT}deepseek-a`; // 16 experts, top-4
    const profile = `${root}/profile.json`;
    await writeProfile(dir, profile);
    const results = `${root}/results`;
    const base = ["--profile", profile, "--results", results];
    const ok = await run([
      ...base,
      "--ratio",
      "0.25",
      "--criterion",
      "frequency",
      "--out",
      `${root}/ok`,
    ]);
    assert.strictEqual(ok.code, 0, ok.stderr);
    const [record] = [...Deno.readDirSync(`${results}/prune`)].map((e) => e.name);
    const rec = JSON.parse(await Deno.readTextFile(`${results}/prune/${record}`));
    assert.strictEqual(rec.kind, "expert-prune");
    assert.strictEqual(rec.schema_version, 1);
    assert.strictEqual(rec.experts_after, 12);
    const file = await SafetensorsFile.open(`${root}/ok/model.safetensors`);
    assert.deepStrictEqual(file.tensors.get("model.layers.1.mlp.gate.weight")!.shape, [12, 64]);
    file.close();

    // An unprofiled model: a copy of the fixture with one weight changed.
    const other = `${root}/other`;
    await Deno.mkdir(other);
    await Deno.copyFile(`${dir}/config.json`, `${other}/config.json`);
    const bytes = await Deno.readFile(`${dir}/model.safetensors`);
    bytes[bytes.length - 1] ^= 1;
    await Deno.writeFile(`${other}/model.safetensors`, bytes);
    const cases: [string[], RegExp][] = [
      [["--ratio", "0.9"], /keeps 2 experts per layer, fewer than the 4 each token routes to/],
      [["--keep", "3"], /--keep 3 experts per layer, fewer than the 4/],
      [["--keep", "6", "--top-k", "7"], /fewer than the 7 each token routes to \(--top-k\)/],
      [["--keep", "16"], /keep between 1 and 15/],
      [["--ratio", "1.5"], /--ratio 1.5: expected a fraction in \(0, 1\)/],
      [["--ratio", "0.5", "--keep", "8"], /give --keep or --ratio, not both/],
      [["--ratio", "0.5", "--criterion", "magic"], /--criterion: unknown value "magic"/],
      [["--ratio", "0.5", "--model", other], /hash mismatch/],
      [["--ratio", "0.5", "--out", `${root}/ok`], /already exists/],
    ];
    for (const [args, message] of cases) {
      const out = args.includes("--out") ? [] : ["--out", `${root}/bad`];
      const r = await run([...base, ...args, ...out]);
      assert.notStrictEqual(r.code, 0, args.join(" "));
      assert.match(r.stderr, message, args.join(" "));
      assert(!r.stderr.includes("    at "), `stack trace for ${args.join(" ")}: ${r.stderr}`);
    }
    const missing = await run(["--ratio", "0.5", "--out", `${root}/bad`]);
    assert.match(missing.stderr, /give one of --profile FILE or --search FILE/);
    // Old profile without saliency: frequency and weight work, reap does not.
    const old = JSON.parse(await Deno.readTextFile(profile));
    delete old.saliency;
    await Deno.writeTextFile(`${root}/old.json`, JSON.stringify(old));
    const noReap = await run([
      "--profile",
      `${root}/old.json`,
      "--ratio",
      "0.5",
      "--out",
      `${root}/bad`,
    ]);
    assert.match(noReap.stderr, /has no "reap" saliency/);
    const oldWeight = await run([
      "--profile",
      `${root}/old.json`,
      "--ratio",
      "0.5",
      "--criterion",
      "weight",
      "--results",
      results,
      "--out",
      `${root}/old-weight`,
    ]);
    assert.strictEqual(oldWeight.code, 0, oldWeight.stderr);
    // Nothing of the failed runs: no folder, no temp folder, one record per success.
    const names = [...Deno.readDirSync(root)].map((e) => e.name).sort();
    assert.deepStrictEqual(names, [
      "ok",
      "old-weight",
      "old.json",
      "other",
      "profile.json",
      "results",
    ]);
    assert.strictEqual([...Deno.readDirSync(`${results}/prune`)].length, 2);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
