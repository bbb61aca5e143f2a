// Compressed experts on CPU: ones = plain top-k_m on every fixture architecture, random
// ces against the plain per-token reference (tests/ce_util.ts), expert width > hidden,
// ces read from a checkpoint, and the config / flag / shape errors.

import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { readJson } from "../lib/io/checkpoint.ts";
import { type RawTensor, writeSafetensors } from "../lib/io/safetensors.ts";
import { cesName, ConfigError, type MlpSpec, parseModelConfig } from "../lib/model/config.ts";
import { forward } from "../lib/model/decoder.ts";
import { cesShape, Model } from "../lib/model/model.ts";
import { writeSyntheticDeepseek } from "../lib/model/synthetic.ts";
import { enableOnModel } from "../lib/methods/compressed_experts.ts";
import { ceVersusReference, INPUT, loadCe, relMaxDiff, SHAPE, uniform } from "./ce_util.ts";
import { DEFAULT_MODEL, FIXTURE_ROOT, FIXTURES } from "./golden.ts";

type Moe = Extract<MlpSpec, { kind: "moe" }>;
const cpu = new CpuBackend();
const MODELS = [...FIXTURES.map((f) => `${FIXTURE_ROOT}${f}`), DEFAULT_MODEL];

async function topK(dir: string): Promise<number> {
  const m = await Model.load(dir, cpu);
  const k = (m.spec.layers.find((l) => l.mlp.kind === "moe")!.mlp as Moe).topK;
  m.close();
  return k;
}

for (const dir of MODELS) {
  const name = dir.split("/").filter(Boolean).pop();
  Deno.test(`ce: ces = ones with renorm_over "main" equals plain top-k_m routing: ${name}`, async () => {
    const k = await topK(dir), km = Math.max(1, k >> 1);
    const ce = await loadCe(dir, cpu, km, undefined, "main");
    const plain = await Model.load(dir, cpu);
    for (const layer of plain.spec.layers) if (layer.mlp.kind === "moe") layer.mlp.topK = km;
    const a = await forward(ce, INPUT, SHAPE), b = await forward(plain, INPUT, SHAPE);
    const err = relMaxDiff(a.logits, b.logits);
    assert(err < 1e-5, `${name}: CE(ones) vs top-${km}: ${err}`);
    ce.close(), plain.close();
  });

  Deno.test(`ce: random ces matches the per-token reference: ${name}`, async () => {
    const k = await topK(dir);
    for (let km = 1; km < k; km++) {
      const model = await loadCe(dir, cpu, km, 100 + km);
      const err = await ceVersusReference(model);
      assert(err < 1e-5, `${name} k_m=${km}: ${err}`);
      model.close();
    }
  });
}

// 48 wider than hidden 32 (grouped from the stacks); 10 not whole gate/up runs, which the
// stacks would pad, so its main experts run one by one.
for (const width of [48, 10]) {
  Deno.test(`ce: expert width ${width}, hidden 32 (d = max(hidden, width)) matches the reference`, async () => {
    const dir = await Deno.makeTempDir();
    await writeSyntheticDeepseek(dir, {
      vocab_size: 256,
      hidden_size: 32,
      intermediate_size: 64,
      moe_intermediate_size: width,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 4,
      n_routed_experts: 6,
      n_shared_experts: 1,
      num_experts_per_tok: 3,
      first_k_dense_replace: 1,
    });
    const model = await loadCe(dir, cpu, 1, 7);
    assert.deepEqual(cesShape(model, model.spec.layers[1].mlp as Moe), [6, 3, Math.max(32, width)]);
    const err = await ceVersusReference(model);
    assert(err < 1e-5, `width ${width}: ${err}`);
    model.close();
    await Deno.remove(dir, { recursive: true });
  });
}

/** A copy of a fixture with `config` changes and extra tensors in its safetensors file. */
async function fixtureCopy(
  src: string,
  configChanges: Record<string, unknown>,
  extra: (m: Model) => RawTensor[],
): Promise<string> {
  const dir = await Deno.makeTempDir();
  const m = await Model.load(src, cpu);
  const tensors: RawTensor[] = [];
  for (const name of m.ckpt.files.keys()) tensors.push(await m.rawTensor(name));
  tensors.push(...extra(m));
  m.close();
  const config = { ...(await readJson(`${src}/config.json`)), ...configChanges };
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(config));
  await writeSafetensors(`${dir}/model.safetensors`, tensors);
  return dir;
}

function cesTensors(m: Model, seed: number, wrongShape = false): RawTensor[] {
  const out: RawTensor[] = [];
  m.spec.layers.forEach((layer, l) => {
    if (layer.mlp.kind !== "moe") return;
    const shape = cesShape(m, layer.mlp);
    if (wrongShape) shape[2] -= 1;
    const v = uniform(shape[0] * shape[1] * shape[2], seed + l, 0.5, 1.5);
    out.push({ name: cesName(m.spec, l), dtype: "F32", shape, bytes: new Uint8Array(v.buffer) });
  });
  return out;
}

// Where the architecture renormalises (norm_topk_prob, Mixtral), the release divides the
// main experts' weights by the sum over all top-k; renorm_over "main" by the main ones.
// Each against the per-token reference; the two must differ, or this would test nothing.
const RENORMALISING = [
  ["olmoe-a", { norm_topk_prob: true }],
  ["deepseek-a", { norm_topk_prob: true }], // eps 1e-20, and top-1 never renormalises
  ["mixtral-a", {}],
] as const;
for (const [fixture, changes] of RENORMALISING) {
  Deno.test(`ce: renormalised main weights over the top-k (default) or the main experts: ${fixture}`, async () => {
    const dir = await fixtureCopy(`${FIXTURE_ROOT}${fixture}`, changes, () => []);
    const k = await topK(dir);
    for (let km = 1; km < k; km++) {
      const logits: Float32Array[] = [];
      for (const over of [undefined, "top_k", "main"] as const) {
        const model = await loadCe(dir, cpu, km, 40 + km, over);
        assert.equal((model.spec.layers.at(-1)!.mlp as Moe).renormOver, over ?? "top_k");
        const err = await ceVersusReference(model);
        assert(err < 1e-5, `${fixture} k_m=${km} ${over}: ${err}`);
        logits.push((await forward(model, INPUT, SHAPE)).logits);
        model.close();
      }
      assert.equal(relMaxDiff(logits[0], logits[1]), 0, "the default is top_k");
      const apart = relMaxDiff(logits[1], logits[2]);
      assert(apart > 1e-3, `${fixture} k_m=${km}: top_k and main differ by ${apart} only`);
    }
    await Deno.remove(dir, { recursive: true });
  });
}

Deno.test("ce: ces and compressed_experts read from a checkpoint", async () => {
  const src = `${FIXTURE_ROOT}olmoe-a`;
  const dir = await fixtureCopy(
    src,
    { compressed_experts: { main_experts: 2 } },
    (m) => cesTensors(m, 5),
  );
  const fromDisk = await Model.load(dir, cpu);
  assert.equal((fromDisk.spec.layers[0].mlp as Moe).mainExperts, 2);
  const inMemory = await loadCe(src, cpu, 2, 5);
  const a = await forward(fromDisk, INPUT, SHAPE), b = await forward(inMemory, INPUT, SHAPE);
  assert.equal(relMaxDiff(a.logits, b.logits), 0);
  fromDisk.close(), inMemory.close();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("ce: a ces whose shape does not match the config is an error naming the tensor", async () => {
  const dir = await fixtureCopy(
    `${FIXTURE_ROOT}olmoe-a`,
    { compressed_experts: { main_experts: 2 } },
    (m) => cesTensors(m, 5, true),
  );
  await assert.rejects(
    () => Model.load(dir, cpu),
    (e: Error) =>
      e instanceof ConfigError && e.message.includes(dir) &&
      e.message.includes("model.layers.0.mlp.ces") && e.message.includes("[16,3,64]"),
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("ce: bad main_experts and dense models are config errors", async () => {
  const raw = await readJson(`${FIXTURE_ROOT}olmoe-a/config.json`); // top-4
  for (const bad of [0, 4, 1.5, "2", null]) {
    assert.throws(
      () =>
        parseModelConfig({ ...raw, compressed_experts: { main_experts: bad } }, "x/config.json"),
      (e: Error) =>
        e instanceof ConfigError && e.message.includes("x/config.json") &&
        e.message.includes("compressed_experts.main_experts") && e.message.includes("[1, 3]"),
      `main_experts ${bad}`,
    );
  }
  // renorm_over: "top_k" (the release) unless the config says "main"
  for (const [section, want] of [[{}, "top_k"], [{ renorm_over: "main" }, "main"]] as const) {
    const spec = parseModelConfig({ ...raw, compressed_experts: { main_experts: 2, ...section } });
    assert.equal((spec.layers[0].mlp as Moe).renormOver, want);
  }
  for (const bad of ["all", "", 1]) {
    assert.throws(
      () =>
        parseModelConfig(
          { ...raw, compressed_experts: { main_experts: 2, renorm_over: bad } },
          "x/config.json",
        ),
      (e: Error) =>
        e instanceof ConfigError && e.message.includes("compressed_experts.renorm_over"),
      `renorm_over ${bad}`,
    );
  }
  // DeepSeek top-1 never renormalises, so with renorm_over "main" neither do CE main
  // weights with k_m = 1; over the top-k (k > 1) they are renormalised.
  const dsRaw = await readJson(`${FIXTURE_ROOT}deepseek-a/config.json`);
  for (
    const [km, over, normalize] of [[1, "main", false], [2, "main", true], [
      1,
      "top_k",
      true,
    ]] as const
  ) {
    const spec = parseModelConfig({
      ...dsRaw,
      norm_topk_prob: true,
      compressed_experts: { main_experts: km, renorm_over: over },
    });
    assert.equal((spec.layers[1].mlp as Moe).renorm.normalize, normalize, `k_m=${km} ${over}`);
  }
  const ok = parseModelConfig({ ...raw, compressed_experts: { main_experts: 3 } });
  assert.equal((ok.layers[0].mlp as Moe).mainExperts, 3);
  const ds = await readJson(`${FIXTURE_ROOT}deepseek-a/config.json`);
  assert.throws(
    () =>
      parseModelConfig(
        { ...ds, n_routed_experts: null, compressed_experts: { main_experts: 1 } },
        "d/config.json",
      ),
    /d\/config.json.*need MoE layers/,
  );
  const model = await Model.load(`${FIXTURE_ROOT}olmoe-a`, cpu);
  assert.throws(() => enableOnModel(model, 9, "--main-experts"), /--main-experts.*\[1, 3\]/);
  model.close();
});
