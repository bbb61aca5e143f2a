// Real scale: the published configs and the checkpoints synthesized from them, sharded
// writers (condense, synthesize) that stream, and a full disk met with an error naming
// the file and no output folder.

import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { closeCheckpoint, openCheckpoint, readTensor, writeWeights } from "../lib/io/checkpoint.ts";
import { parseModelConfig } from "../lib/model/config.ts";
import { forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import {
  checkpointWeights,
  PUBLISHED,
  synthesizeCheckpoint,
  synthesizedConfig,
} from "../lib/model/published.ts";
import { condenseInMemory, writeCondensedCheckpoint } from "../lib/methods/condense.ts";
import type { Plan } from "../lib/methods/plan.ts";
import { runSearchJob, type SearchSettings } from "../lib/methods/search_job.ts";
import { DEFAULT_CALIBRATION } from "../lib/methods/calibration.ts";
import { ActivationStore } from "../lib/methods/activations.ts";
import { DEFAULT_MODEL, FIXTURE_ROOT } from "./golden.ts";

const ROOT = new URL("../", import.meta.url).pathname;
const tmp = await Deno.makeTempDir({ prefix: "moe-scale-" });

Deno.test("synthesized tensors have the fixtures' names and shapes for every model type", async () => {
  for (const fixture of ["deepseek-a", "qwen2_moe-a", "olmoe-a", "mixtral-a", "qwen3_moe-a"]) {
    const ckpt = await openCheckpoint(`${FIXTURE_ROOT}${fixture}`);
    const want = new Map(
      [...ckpt.files.keys()].map((n) => [n, ckpt.files.get(n)!.tensors.get(n)!.shape]),
    );
    closeCheckpoint(ckpt);
    const got = new Map(checkpointWeights(ckpt.config).map((w) => [w.name, w.shape]));
    assert.deepStrictEqual(
      [...got.keys()].sort(),
      [...want.keys()].sort(),
      `${fixture}: tensor names`,
    );
    for (const [name, shape] of want) assert.deepStrictEqual(got.get(name), shape, name);
  }
});

Deno.test("published configs parse to the published shapes", () => {
  const expect: Record<string, number[]> = {
    // layers, hidden, heads, kv heads, head dim, experts, top-k, expert width, shared
    // width, dense layers first, vocabulary
    "deepseek-moe-16b": [28, 2048, 16, 16, 128, 64, 6, 1408, 2816, 1, 102400],
    "qwen1.5-moe-a2.7b": [24, 2048, 16, 16, 128, 60, 4, 1408, 5632, 0, 151936],
    "olmoe-1b-7b": [16, 2048, 16, 16, 128, 64, 8, 1024, 0, 0, 50304],
    "mixtral-8x7b": [32, 4096, 32, 8, 128, 8, 2, 14336, 0, 0, 32000],
    "qwen3-30b-a3b": [48, 2048, 32, 4, 128, 128, 8, 768, 0, 0, 151936],
  };
  for (const [name, want] of Object.entries(expect)) {
    const spec = parseModelConfig(PUBLISHED[name].config, name);
    const moe = spec.layers.find((l) => l.mlp.kind === "moe")!.mlp as {
      experts: number;
      topK: number;
      expertWidth: number;
      sharedWidth: number;
    };
    const dense = spec.layers.findIndex((l) => l.mlp.kind === "moe");
    assert.deepStrictEqual(
      [
        spec.numLayers,
        spec.hidden,
        spec.heads,
        spec.kvHeads,
        spec.headDim,
        moe.experts,
        moe.topK,
        moe.expertWidth,
        moe.sharedWidth,
        dense,
        spec.vocab,
      ],
      want,
      name,
    );
  }
  // Renormalised top-k where the published config says so.
  const renorm = (name: string) =>
    (parseModelConfig(PUBLISHED[name].config).layers[1].mlp as { renorm: { normalize: boolean } })
      .renorm.normalize;
  assert.deepStrictEqual(
    Object.keys(PUBLISHED).map(renorm),
    [false, false, false, true, true], // deepseek, qwen1.5, olmoe, mixtral (always), qwen3
  );
  for (const p of Object.values(PUBLISHED)) assert.match(p.source, /^https:\/\/huggingface\.co\//);
  assert.equal(synthesizedConfig("olmoe-1b-7b", 3, 0).num_hidden_layers, 3);
  assert.throws(() => synthesizedConfig("olmoe-1b-7b", 17, 0), /has 16 layers/);
  assert.throws(() => synthesizedConfig("gpt-5", 1, 0), /no published config "gpt-5"/);
});

Deno.test("synthesize: sharded, loadable, seeded, a prefix is the longer model's prefix", async () => {
  // A DeepSeekMoE layout at a size a test can write (the layout is the same at any size).
  const config = {
    ...PUBLISHED["deepseek-moe-16b"].config,
    hidden_size: 64,
    intermediate_size: 96,
    moe_intermediate_size: 16,
    num_attention_heads: 4,
    num_key_value_heads: 4,
    n_routed_experts: 8,
    num_experts_per_tok: 3,
    vocab_size: 300,
    num_hidden_layers: 3,
  };
  const write = async (name: string, cfg: Record<string, unknown>, seed: number) => {
    const dir = `${tmp}/${name}`;
    await synthesizeCheckpoint(cfg, dir, {
      seed,
      maxShardBytes: 20_000,
      tokenizerDir: DEFAULT_MODEL,
    });
    return dir;
  };
  const a = await write("syn-a", config, 7);
  const files = [...Deno.readDirSync(a)].map((e) => e.name).sort();
  assert(files.includes("model.safetensors.index.json") && files.includes("tokenizer.json"));
  const shards = files.filter((f) => f.endsWith(".safetensors"));
  assert(shards.length > 3, `${shards.length} shards`);
  shards.forEach((f, i) =>
    assert.equal(
      f,
      `model-${String(i + 1).padStart(5, "0")}-of-${
        String(shards.length).padStart(5, "0")
      }.safetensors`,
    )
  );
  for (const f of shards) {
    // A shard passes the limit only when it holds one tensor larger than the limit.
    const ck = Deno.statSync(`${a}/${f}`).size;
    if (ck > 20_000 + 4096) {
      const index = JSON.parse(Deno.readTextFileSync(`${a}/model.safetensors.index.json`));
      assert.equal(Object.values(index.weight_map).filter((s) => s === f).length, 1, f);
    }
  }
  const model = await Model.load(a, new CpuBackend());
  const ids = Int32Array.from({ length: 24 }, (_, i) => (i * 37) % 256);
  const r = await forward(model, ids, { batch: 2, seqLen: 12 }, { collectRouter: true });
  model.close();
  assert(r.logits.every(Number.isFinite));
  // Routing is not degenerate: router logits of std near 1.
  const logits = r.routerLogits!.get(1)!;
  const mean = logits.reduce((s, v) => s + v, 0) / logits.length;
  const std = Math.sqrt(logits.reduce((s, v) => s + (v - mean) ** 2, 0) / logits.length);
  assert(std > 0.5 && std < 2, `router logit std ${std}`);

  const same = await write("syn-same", config, 7);
  const other = await write("syn-other", config, 8);
  const prefix = await write("syn-prefix", { ...config, num_hidden_layers: 2 }, 7);
  const [ca, cs, co, cp] = await Promise.all([a, same, other, prefix].map(openCheckpoint));
  const name = "model.layers.1.mlp.experts.2.up_proj.weight";
  const bytes = async (c: typeof ca) => (await readTensor(c, name)).bytes;
  assert.deepStrictEqual(await bytes(cs), await bytes(ca));
  assert.deepStrictEqual(await bytes(cp), await bytes(ca));
  assert.notDeepStrictEqual(await bytes(co), await bytes(ca));
  [ca, cs, co, cp].forEach(closeCheckpoint);
});

const provenance = { source: "test", source_hash: "-", search: null, variant: "t", num_changed: 2 };
const plan: Plan = new Map([
  [2, { kind: "condense", experts: [3, 1], wbar: [0.25, 0.125] }],
  [4, { kind: "layerdrop" }],
]);

Deno.test("condense writes shards and an index like its source, and they load", async () => {
  // The default model sharded (6 shards of at most 5 MB).
  const sharded = `${tmp}/default-sharded`;
  await Deno.mkdir(sharded);
  const src = await openCheckpoint(DEFAULT_MODEL);
  const raws = await Promise.all([...src.files.keys()].map((n) => readTensor(src, n)));
  closeCheckpoint(src);
  await writeWeights(sharded, raws, { maxShardBytes: 5e6 });
  for (const f of ["config.json", "tokenizer.json", "tokenizer_config.json"]) {
    await Deno.copyFile(`${DEFAULT_MODEL}/${f}`, `${sharded}/${f}`);
  }
  const ids = Int32Array.from({ length: 16 }, (_, i) => (i * 29 + 3) % 256);
  const shape = { batch: 2, seqLen: 8 };
  for (
    const [source, layout, wantShards] of [
      [sharded, {}, true], // sharded like the source
      [DEFAULT_MODEL, { maxShardBytes: 4e6 }, true], // larger than one shard
      [DEFAULT_MODEL, {}, false], // fits one file, as its source
    ] as const
  ) {
    const out = `${tmp}/condensed-${Math.random().toString(36).slice(2)}`;
    const model = await Model.load(source, new CpuBackend());
    const sizes = await writeCondensedCheckpoint(model, plan, out, provenance, layout);
    const files = [...Deno.readDirSync(out)].map((e) => e.name);
    assert.equal(files.includes("model.safetensors.index.json"), wantShards, files.join());
    assert.equal(files.includes("model.safetensors"), !wantShards, files.join());
    const onDisk = files.filter((f) => f.endsWith(".safetensors"))
      .reduce((n, f) => n + Deno.statSync(`${out}/${f}`).size, 0);
    assert.equal(sizes.bytesAfter, onDisk);
    const loaded = await Model.load(out, new CpuBackend());
    const inMemory = await condenseInMemory(model, plan, provenance);
    assert.deepStrictEqual(
      (await forward(loaded, ids, shape)).logits,
      (await forward(inMemory, ids, shape)).logits,
    );
    loaded.close();
    model.close();
  }
});

Deno.test("activation store: memory up to its budget, the rest on disk, exact round trips", async () => {
  const parent = await Deno.makeTempDir({ dir: tmp });
  const store = new ActivationStore(100, parent);
  const a = [new Float32Array([1, 2, 3]), new Float32Array([4, 5])]; // 20 bytes: in memory
  const b = [Float32Array.from({ length: 30 }, (_, i) => i / 7), new Float32Array([NaN, -0])];
  await store.set("a", a);
  await store.set("b", b); // 128 bytes: past the budget, on disk
  assert.deepStrictEqual(store.stats, {
    memoryBytes: 20,
    peakMemoryBytes: 20,
    spilledBytes: 128,
    readBytes: 0,
  });
  assert.strictEqual((await store.get("a"))[0], a[0]);
  assert.deepStrictEqual(await store.get("b"), b);
  assert.deepStrictEqual(await store.batch("b", 1), b[1]);
  assert.equal(store.stats.readBytes, 128 + 8);
  const [dir] = [...Deno.readDirSync(parent)].map((e) => `${parent}/${e.name}`);
  assert.equal([...Deno.readDirSync(dir)].length, 1);
  store.delete("b");
  assert(!store.has("b"));
  assert.equal([...Deno.readDirSync(dir)].length, 0);
  await store.set("a", [new Float32Array(30)]); // replaced: 120 bytes, spilled
  assert.equal(store.stats.memoryBytes, 0);
  store.close();
  assert.deepStrictEqual([...Deno.readDirSync(parent)], []);
  await assert.rejects(store.get("a"), /nothing under "a"/);
});

Deno.test("search with every cached activation spilled to disk gives the same results", async () => {
  const settings: SearchSettings = {
    model: DEFAULT_MODEL.replace(/\/+$/, ""),
    data: DEFAULT_CALIBRATION,
    name: "mem",
    docs: 4,
    maxLen: 10,
    profileMaxLen: null,
    profile: null,
    batchSize: 2,
    bos: "auto",
    metric: "js-hidden",
    expertMetric: "js-hidden",
    experts: 2,
    layers: 3,
    variants: ["sr", "layerdrop"],
    naive: false,
    layerwise: false,
  };
  const root = `${tmp}/spill-results`, spillDir = `${tmp}/spill`;
  await Deno.mkdir(spillDir);
  const opts = { resultsRoot: root, progress: false, log: () => {} };
  const inMemory = (await runSearchJob(settings, opts)).results as Record<string, unknown>;
  const spilled = (await runSearchJob(
    { ...settings, name: "spilled", layerwise: true, cacheMemory: 0, spillDir },
    opts,
  )).results as Record<string, unknown>;
  const strip = (r: unknown) =>
    JSON.parse(
      JSON.stringify(r, (k, v) => (k === "seconds" || k === "outputSeconds" ? undefined : v)),
    );
  assert.deepStrictEqual(strip(spilled.expert_search), strip(inMemory.expert_search));
  assert.deepStrictEqual(strip(spilled.layer_search), strip(inMemory.layer_search));
  const cache = spilled.cache as Record<string, number>;
  assert.equal(cache.peak_memory_bytes, 0);
  assert(cache.spilled_bytes > 0 && cache.spill_read_bytes > cache.spilled_bytes);
  assert.equal((inMemory.cache as Record<string, number>).spilled_bytes, 0);
  assert.deepStrictEqual([...Deno.readDirSync(spillDir)], [], "spill folder left behind");
});

/** Run deno code with writes limited to `kb` KiB per file (a disk that fills). */
async function withFullDisk(kb: number, args: string[]) {
  const out = await new Deno.Command("bash", {
    args: ["-c", `trap "" XFSZ; ulimit -f ${kb}; exec "$@"`, "bash", Deno.execPath(), ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

function leftovers(dir: string, base: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.startsWith(base));
}

Deno.test("a disk that fills: synthesize and condense name the file, leave no folder", async () => {
  const out = `${tmp}/full-synth`;
  const r = await withFullDisk(2048, [
    "run",
    "-A",
    `${ROOT}scripts/synthesize.ts`,
    "--like",
    "olmoe-1b-7b",
    "--layers",
    "1",
    "--max-shard-size",
    "100MB",
    "--quiet",
    "--out",
    out,
  ]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(
    r.stderr,
    /^error: \S*full-synth\.tmp-\d+\/model-00001-of-000\d\d\.safetensors: write failed after \d+ of \d+ bytes \(File too large/m,
  );
  assert.deepStrictEqual(leftovers(tmp, "full-synth"), []);

  const code = `
    import { Model } from "${ROOT}lib/model/model.ts";
    import { CpuBackend } from "${ROOT}lib/backend/cpu.ts";
    import { writeCondensedCheckpoint } from "${ROOT}lib/methods/condense.ts";
    import { runMain } from "${ROOT}lib/cli.ts";
    await runMain(async () => {
      const m = await Model.load("${DEFAULT_MODEL}", new CpuBackend());
      await writeCondensedCheckpoint(m, new Map([[1, { kind: "layerdrop" }]]), "${tmp}/full-cond",
        { source: "t", source_hash: "-", search: null, variant: "t", num_changed: 1 },
        { maxShardBytes: 3e6 });
    });`;
  const c = await withFullDisk(1024, ["eval", code]);
  assert.equal(c.code, 1, c.stderr);
  assert.match(c.stderr, /full-cond\.tmp-\d+\/model-000\d\d-of-000\d\d\.safetensors: write failed/);
  assert.deepStrictEqual(leftovers(tmp, "full-cond"), []);

  // A spill that meets a full disk names its file and leaves no spill folder.
  const spillParent = await Deno.makeTempDir({ dir: tmp });
  const spill = `
    import { ActivationStore } from "${ROOT}lib/methods/activations.ts";
    import { runMain } from "${ROOT}lib/cli.ts";
    await runMain(async () => {
      const store = new ActivationStore(0, "${spillParent}");
      try {
        await store.set("h3", [new Float32Array(2 ** 20)]);
      } finally {
        store.close();
      }
    });`;
  const sp = await withFullDisk(1024, ["eval", spill]);
  assert.equal(sp.code, 1, sp.stderr);
  assert.match(
    sp.stderr,
    /^error: \S+\/moe-condense-spill-\w+\/h3\.f32: spill write failed \(File too large/m,
  );
  assert.deepStrictEqual([...Deno.readDirSync(spillParent)], []);
});

globalThis.addEventListener("unload", () => Deno.removeSync(tmp, { recursive: true }));
