// Condensed checkpoints: the folder written by writeCondensedCheckpoint loads and gives
// the same outputs as condensing the original model in memory, and stays close to the
// search-time arithmetic (which does not round the wbar fold-in to the source dtype).

import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { Model } from "../lib/model/model.ts";
import { embed, finalNorm, forward, lmHead } from "../lib/model/decoder.ts";
import { condenseInMemory, writeCondensedCheckpoint } from "../lib/methods/condense.ts";
import { type Plan, runPlannedLayer } from "../lib/methods/plan.ts";
import { DEFAULT_MODEL, FIXTURE_ROOT } from "./golden.ts";

const provenance = {
  source: "test",
  source_hash: "-",
  search: null,
  variant: "test",
  num_changed: 0,
};

async function searchPathLogits(model: Model, ids: Int32Array, plan: Plan): Promise<Float32Array> {
  const be = model.backend, shape = { batch: 1, seqLen: ids.length };
  let h = await embed(model, ids);
  for (let l = 0; l < model.spec.numLayers; l++) {
    h = await runPlannedLayer(model, l, h, shape, plan.get(l));
  }
  return (await be.read(await lmHead(model, await finalNorm(model, h)))).slice();
}

async function check(dir: string, plan: Plan, tol: number) {
  const out = await Deno.makeTempDir();
  await Deno.remove(out);
  const src = await Model.load(dir, new CpuBackend());
  const ids = Int32Array.from(
    { length: 12 },
    (_, i) => (i * 37 + 5) % Math.min(256, src.spec.vocab),
  );
  const shape = { batch: 1, seqLen: ids.length };
  try {
    const sizes = await writeCondensedCheckpoint(src, plan, out, {
      ...provenance,
      num_changed: plan.size,
    });
    assert(
      sizes.bytesAfter < sizes.bytesBefore,
      `${dir}: ${sizes.bytesAfter} >= ${sizes.bytesBefore}`,
    );
    const loaded = await Model.load(out, new CpuBackend());
    // Other loaders must refuse the folder: another model_type and architectures, no
    // auto_map; the original ones are kept under "cdmoe.original".
    const cfg = JSON.parse(await Deno.readTextFile(`${out}/config.json`));
    const source = src.ckpt.config;
    assert.strictEqual(cfg.model_type, `${source.model_type}_cdmoe`);
    assert.deepStrictEqual(
      cfg.architectures,
      (source.architectures as string[]).map((a) => a.replace(/ForCausalLM$/, "CdmoeForCausalLM")),
    );
    assert.strictEqual(cfg.auto_map, undefined);
    assert.deepStrictEqual(cfg.cdmoe.original, {
      model_type: source.model_type,
      architectures: source.architectures,
      ...(source.auto_map ? { auto_map: source.auto_map } : {}),
    });
    // Only tensors something reads: a layer with no MLP left has no post-attention norm.
    for (const [l, c] of plan) {
      const norm = `model.layers.${l}.post_attention_layernorm.weight`;
      const mlp = loaded.spec.layers[l].mlp.kind;
      if (c.kind === "blockdrop" || mlp === "none") assert(!loaded.ckpt.files.has(norm), norm);
      else assert(loaded.ckpt.files.has(norm), norm);
    }
    const inMemory = await condenseInMemory(src, plan, provenance);
    const a = (await forward(loaded, ids, shape)).logits;
    const b = (await forward(inMemory, ids, shape)).logits;
    assert.deepStrictEqual(a, b, `${dir}: loaded checkpoint and in-memory condensing differ`);
    // Changed layers have the expected kinds.
    for (const [l, c] of plan) {
      const spec = loaded.spec.layers[l];
      if (c.kind === "blockdrop") assert(!spec.attention && spec.mlp.kind === "none");
      else if (c.kind === "layerdrop") assert(spec.attention && spec.mlp.kind === "none");
      else assert(spec.mlp.kind === "dense" || spec.mlp.kind === "none");
    }
    const c = await searchPathLogits(src, ids, plan);
    let maxAbs = 0, maxDiff = 0;
    for (let i = 0; i < c.length; i++) {
      maxAbs = Math.max(maxAbs, Math.abs(c[i]));
      maxDiff = Math.max(maxDiff, Math.abs(c[i] - a[i]));
    }
    console.log(`  ${dir.split("/").at(-1)}: checkpoint vs search path ${maxDiff / maxAbs}`);
    assert(
      maxDiff <= tol * maxAbs,
      `${dir}: condensed checkpoint vs search path ${maxDiff / maxAbs}`,
    );
    loaded.close();
    return sizes;
  } finally {
    src.close();
    await Deno.remove(out, { recursive: true }).catch(() => {});
  }
}

Deno.test("condensed checkpoint = in-memory condensing: default model (bf16)", async () => {
  const sizes = await check(
    DEFAULT_MODEL,
    new Map([
      [1, { kind: "condense", experts: [3, 7], wbar: [0.2, 0.31] }],
      [3, { kind: "condense", experts: [], wbar: [] }],
      [4, { kind: "layerdrop" }],
      [5, { kind: "blockdrop" }],
    ]),
    2e-2, // bf16 rounding of the wbar-scaled down projections
  );
  assert(sizes.bytesAfter < 0.6 * sizes.bytesBefore);
});

Deno.test("condensed checkpoint = search path at 1e-5: deepseek-a (f32, shared experts)", async () => {
  // f32 weights: the fold is exact up to summation order, so a wrong wbar shows.
  await check(
    `${FIXTURE_ROOT}deepseek-a`,
    new Map([
      [1, { kind: "condense", experts: [3, 7, 11], wbar: [0.21, 0.17, 0.12] }],
      [2, { kind: "condense", experts: [], wbar: [] }],
      [3, { kind: "condense", experts: [0, 5, 9, 14], wbar: [0.3, 0.25, 0.2, 0.15] }],
    ]),
    1e-5,
  );
});

Deno.test("condensed checkpoint = in-memory condensing: qwen2_moe (gated shared kept)", async () => {
  await check(
    `${FIXTURE_ROOT}qwen2_moe-a`,
    new Map([
      [0, { kind: "condense", experts: [2, 5], wbar: [0.3, 0.2] }],
      [1, { kind: "condense", experts: [], wbar: [] }],
    ]),
    1e-5,
  );
});

// A condensed Qwen3-MoE layer is its kept experts alone (no shared expert), and a layer
// keeping none has no MLP; the q/k norms stay in the condensed checkpoint.
Deno.test("condensed checkpoint = in-memory condensing: qwen3_moe (kept experts only)", async () => {
  const dir = `${FIXTURE_ROOT}qwen3_moe-a`;
  const plan: Plan = new Map([
    [0, { kind: "condense", experts: [1, 6], wbar: [0.6, 0.35] }],
    [2, { kind: "condense", experts: [], wbar: [] }],
    [3, { kind: "layerdrop" }],
  ]);
  await check(dir, plan, 1e-5);
  const src = await Model.load(dir, new CpuBackend());
  const condensed = await condenseInMemory(src, plan, provenance);
  assert.deepEqual(
    condensed.spec.layers.map((l) => l.mlp),
    [{ kind: "dense", width: 2 * 32 }, src.spec.layers[1].mlp, { kind: "none" }, {
      kind: "none",
    }],
  );
  assert.equal(condensed.spec.qkNormPerHead, true);
  src.close();
});

Deno.test("condensed checkpoint = in-memory condensing: olmoe and mixtral", async () => {
  await check(
    `${FIXTURE_ROOT}olmoe-a`,
    new Map([
      [0, { kind: "condense", experts: [], wbar: [] }],
      [1, { kind: "condense", experts: [4], wbar: [0.25] }],
    ]),
    1e-5,
  );
  await check(
    `${FIXTURE_ROOT}mixtral-bf16`,
    new Map([[1, { kind: "condense", experts: [0, 6], wbar: [0.5, 0.4] }]]),
    2e-2,
  );
});

Deno.test("condensed checkpoints written the old way (original model_type) still load", async () => {
  const src = await Model.load(`${FIXTURE_ROOT}deepseek-a`, new CpuBackend());
  const out = await Deno.makeTempDir();
  await Deno.remove(out);
  const plan: Plan = new Map([[2, { kind: "condense", experts: [1, 4], wbar: [0.2, 0.1] }]]);
  try {
    await writeCondensedCheckpoint(src, plan, out, { ...provenance, num_changed: 1 });
    const ids = Int32Array.from({ length: 9 }, (_, i) => (i * 29 + 3) % 256);
    const shape = { batch: 1, seqLen: ids.length };
    const loaded = await Model.load(out, new CpuBackend());
    const want = (await forward(loaded, ids, shape)).logits;
    loaded.close();
    // Before: the source's model_type, architectures and auto_map, plus the cdmoe section.
    const cfg = JSON.parse(await Deno.readTextFile(`${out}/config.json`));
    const { original, ...cdmoe } = cfg.cdmoe;
    await Deno.writeTextFile(`${out}/config.json`, JSON.stringify({ ...cfg, ...original, cdmoe }));
    const old = await Model.load(out, new CpuBackend());
    assert.deepStrictEqual((await forward(old, ids, shape)).logits, want);
    old.close();
    // A "_cdmoe" model_type whose original does not match is refused, naming the key.
    await Deno.writeTextFile(
      `${out}/config.json`,
      JSON.stringify({ ...cfg, model_type: "qwen2_moe_cdmoe" }),
    );
    await assert.rejects(
      () => Model.load(out, new CpuBackend()),
      /config\.json: model_type "qwen2_moe_cdmoe" marks a condensed checkpoint, but "cdmoe\.original\.model_type" is "deepseek"/,
    );
  } finally {
    src.close();
    await Deno.remove(out, { recursive: true }).catch(() => {});
  }
});
