// safetensors and checkpoint folders: round trips, and a clear error naming the file
// and the problem for every kind of bad input.
import assert from "node:assert";
import {
  f32Tensor,
  f32ToBf16Bits,
  type RawTensor,
  SafetensorsFile,
  toFloat32,
  toInt32,
  writeSafetensors,
} from "../lib/io/safetensors.ts";
import { closeCheckpoint, openCheckpoint, readTensor } from "../lib/io/checkpoint.ts";
import { parseModelConfig } from "../lib/model/config.ts";
import { Model } from "../lib/model/model.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { forward } from "../lib/model/decoder.ts";
import { FIXTURE_ROOT } from "./golden.ts";
import { randn } from "./util.ts";

const tmp = await Deno.makeTempDir({ prefix: "moe-io-" });

/** Write a raw safetensors file from a header object and a data block. */
async function writeRaw(
  name: string,
  header: unknown,
  data: Uint8Array,
  lenOverride?: bigint,
): Promise<string> {
  const h = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lenOverride ?? BigInt(h.length), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  const path = `${tmp}/${name}`;
  await Deno.writeFile(path, out);
  return path;
}

async function rejects(path: string, pattern: RegExp): Promise<void> {
  await assert.rejects(SafetensorsFile.open(path), (e: Error) => {
    assert.match(e.message, new RegExp(path.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")));
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("safetensors round trip of every dtype, lazily read by byte range", async () => {
  const f = randn(15, 1);
  const bf = f32ToBf16Bits(f);
  const i64 = new BigInt64Array([1n, -2n, 3000000000n]);
  const tensors: RawTensor[] = [
    f32Tensor("a.f32", [3, 5], f),
    { name: "b.bf16", dtype: "BF16", shape: [15], bytes: new Uint8Array(bf.buffer) },
    {
      name: "c.f16",
      dtype: "F16",
      shape: [2],
      bytes: new Uint8Array(new Uint16Array([0x3c00, 0xc000]).buffer),
    },
    { name: "d.i64", dtype: "I64", shape: [3], bytes: new Uint8Array(i64.buffer) },
    {
      name: "e.i32",
      dtype: "I32",
      shape: [2],
      bytes: new Uint8Array(new Int32Array([7, -9]).buffer),
    },
    { name: "f.u8", dtype: "U8", shape: [3], bytes: new Uint8Array([1, 2, 255]) },
    { name: "g.bool", dtype: "BOOL", shape: [2], bytes: new Uint8Array([1, 0]) },
    { name: "h.empty", dtype: "F32", shape: [0, 4], bytes: new Uint8Array(0) },
  ];
  const path = `${tmp}/round.safetensors`;
  await writeSafetensors(path, tensors, { format: "pt", note: "x" });
  const file = await SafetensorsFile.open(path);
  assert.equal(file.metadata.note, "x");
  assert.deepEqual(toFloat32(await file.read("a.f32")), f);
  const widened = toFloat32(await file.read("b.bf16"));
  for (let i = 0; i < f.length; i++) {
    assert(Math.abs(widened[i] - f[i]) <= Math.abs(f[i]) * 2 ** -8);
  }
  assert.deepEqual([...toFloat32(await file.read("c.f16"))], [1, -2]);
  assert.equal(toInt32(await file.read("d.i64"))[2], 3000000000 | 0);
  assert.deepEqual([...toInt32(await file.read("e.i32"))], [7, -9]);
  assert.deepEqual([...toInt32(await file.read("f.u8"))], [1, 2, 255]);
  assert.deepEqual([...toInt32(await file.read("g.bool"))], [1, 0]);
  assert.equal((await file.read("h.empty")).bytes.length, 0);
  // Data block is 8-byte aligned, as the reference writer does.
  const headerLen = Number(new DataView((await Deno.readFile(path)).buffer).getBigUint64(0, true));
  assert.equal((8 + headerLen) % 8, 0);
  file.close();
  assert.deepEqual([...Deno.readDirSync(tmp)].filter((e) => e.name.endsWith(".tmp")), []);
});

Deno.test("bf16 rounding is round-to-nearest-even", () => {
  // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to even (1).
  const bits = f32ToBf16Bits(new Float32Array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5]));
  assert.deepEqual([...bits], [0x3f80, 0x3f82, 0xc020]);
});

Deno.test("safetensors bad inputs name the file and the problem", async () => {
  const ok = { x: { dtype: "F32", shape: [2], data_offsets: [0, 8] } };
  await Deno.writeFile(`${tmp}/short`, new Uint8Array(3));
  await rejects(`${tmp}/short`, /too short/);
  await rejects(await writeRaw("trunc", ok, new Uint8Array(4)), /past the end.*truncated/);
  await rejects(
    await writeRaw("hlen", ok, new Uint8Array(8), 1000n),
    /header length 1000 runs past the end/,
  );
  await rejects(await writeRaw("hbig", ok, new Uint8Array(8), 1n << 40n), /implausibly large/);
  await rejects(await writeRaw("json", "not an object", new Uint8Array(0)), /not a JSON object/);
  await rejects(
    await writeRaw(
      "dtype",
      { x: { dtype: "Q4", shape: [2], data_offsets: [0, 8] } },
      new Uint8Array(8),
    ),
    /tensor "x": unknown dtype "Q4"/,
  );
  await rejects(
    await writeRaw(
      "shape",
      { x: { dtype: "F32", shape: [3], data_offsets: [0, 8] } },
      new Uint8Array(8),
    ),
    /needs 12 bytes but data_offsets span 8/,
  );
  await rejects(
    await writeRaw(
      "range",
      { x: { dtype: "F32", shape: [2], data_offsets: [8, 16] } },
      new Uint8Array(8),
    ),
    /run past the end/,
  );
  await rejects(
    await writeRaw(
      "order",
      { x: { dtype: "F32", shape: [2], data_offsets: [8, 0] } },
      new Uint8Array(8),
    ),
    /bad data_offsets/,
  );
  await rejects(
    await writeRaw("overlap", {
      x: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
      y: { dtype: "F32", shape: [2], data_offsets: [4, 12] },
    }, new Uint8Array(12)),
    /"x" and "y" overlap/,
  );
  const bad = new Uint8Array([0xff, 0xfe]);
  const path = `${tmp}/utf8`;
  const out = new Uint8Array(10);
  new DataView(out.buffer).setBigUint64(0, 2n, true);
  out.set(bad, 8);
  await Deno.writeFile(path, out);
  await rejects(path, /not valid UTF-8 JSON/);
});

/** Copy a fixture into a fresh folder, then let `edit` break it. */
async function brokenCopy(name: string, edit: (dir: string) => Promise<void>): Promise<string> {
  const dir = await Deno.makeTempDir({ dir: tmp });
  for (const f of ["config.json", "model.safetensors"]) {
    await Deno.copyFile(`${FIXTURE_ROOT}${name}/${f}`, `${dir}/${f}`);
  }
  await edit(dir);
  return dir;
}

Deno.test("sharded checkpoint loads and computes the same as the single file", async () => {
  const src = `${FIXTURE_ROOT}deepseek-bf16`;
  const single = await openCheckpoint(src);
  const names = [...single.files.keys()].sort();
  const dir = await Deno.makeTempDir({ dir: tmp });
  await Deno.copyFile(`${src}/config.json`, `${dir}/config.json`);
  const half = Math.ceil(names.length / 2);
  const shards = [names.slice(0, half), names.slice(half)];
  const weightMap: Record<string, string> = {};
  for (const [i, shard] of shards.entries()) {
    const file = `model-0000${i + 1}-of-00002.safetensors`;
    await writeSafetensors(
      `${dir}/${file}`,
      await Promise.all(shard.map((n) => readTensor(single, n))),
    );
    for (const n of shard) weightMap[n] = file;
  }
  await Deno.writeTextFile(
    `${dir}/model.safetensors.index.json`,
    JSON.stringify({ metadata: {}, weight_map: weightMap }),
  );
  const ids = new Int32Array([3, 9, 27, 81, 243, 1]);
  const run = async (d: string) => {
    const m = await Model.load(d, new CpuBackend());
    const r = await forward(m, ids, { batch: 2, seqLen: 3 });
    m.close();
    return r.logits;
  };
  assert.deepEqual(await run(dir), await run(src));
  closeCheckpoint(single);
});

Deno.test("checkpoint bad inputs: missing tensors, broken index, bad config", async () => {
  // A tensor named in the index but missing from its shard.
  let dir = await brokenCopy("olmoe-a", async (d) => {
    await Deno.writeTextFile(
      `${d}/model.safetensors.index.json`,
      JSON.stringify({
        weight_map: {
          "model.norm.weight": "model.safetensors",
          "ghost.weight": "model.safetensors",
        },
      }),
    );
  });
  await assert.rejects(
    openCheckpoint(dir),
    /index\.json: tensor "ghost\.weight" is mapped to model\.safetensors, which does not contain it/,
  );

  dir = await brokenCopy("olmoe-a", async (d) => {
    await Deno.writeTextFile(`${d}/model.safetensors.index.json`, JSON.stringify({ metadata: {} }));
  });
  await assert.rejects(openCheckpoint(dir), /index\.json: missing "weight_map"/);

  dir = await brokenCopy("olmoe-a", (d) => Deno.remove(`${d}/model.safetensors`));
  await assert.rejects(
    openCheckpoint(dir),
    /no model\.safetensors or model\.safetensors\.index\.json/,
  );

  dir = await brokenCopy("olmoe-a", (d) => Deno.writeTextFile(`${d}/config.json`, "{ not json"));
  await assert.rejects(openCheckpoint(dir), /config\.json: malformed JSON/);

  // A tensor the config needs is absent: named when the forward pass asks for it.
  dir = await brokenCopy("deepseek-bf16", async (d) => {
    const ck = await openCheckpoint(d);
    const keep = [...ck.files.keys()].filter((n) =>
      n !== "model.layers.1.mlp.experts.3.up_proj.weight"
    );
    const tensors = await Promise.all(keep.map((n) => readTensor(ck, n)));
    closeCheckpoint(ck);
    await writeSafetensors(`${d}/model.safetensors`, tensors);
  });
  const m = await Model.load(dir, new CpuBackend());
  await assert.rejects(
    forward(m, new Int32Array(64).map((_, i) => i), { batch: 4, seqLen: 16 }),
    /missing tensor "model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"/,
  );
  m.close();
});

Deno.test("config errors: unsupported model_type, missing or malformed fields", async () => {
  const base = JSON.parse(await Deno.readTextFile(`${FIXTURE_ROOT}qwen2_moe-a/config.json`));
  const bad = (change: (c: Record<string, unknown>) => void, pattern: RegExp) => {
    const c = structuredClone(base);
    change(c);
    assert.throws(() => parseModelConfig(c, "some/config.json"), (e: Error) => {
      assert.match(e.message, /^some\/config\.json: /);
      assert.match(e.message, pattern);
      return true;
    });
  };
  bad(
    (c) => (c.model_type = "llama"),
    /unsupported model_type "llama" \(supported: deepseek, qwen2_moe, qwen3_moe, olmoe, mixtral\)/,
  );
  bad((c) => delete c.model_type, /missing "model_type"/);
  bad((c) => (c.hidden_size = "64"), /"hidden_size" must be an integer/);
  bad((c) => (c.num_key_value_heads = 3), /not a multiple of num_key_value_heads 3/);
  bad((c) => (c.num_experts_per_tok = 9), /num_experts_per_tok 9 exceeds the number of experts 8/);
  bad((c) => (c.hidden_act = "gelu"), /hidden_act "gelu" is not supported/);
  bad((c) => (c.rope_scaling = { type: "dynamic", factor: 2 }), /rope_scaling .* is not supported/);
  bad((c) => (c.norm_topk_prob = "yes"), /"norm_topk_prob" must be true or false/);
  // Keys left out fall back to the config class defaults, as transformers does.
  const c = structuredClone(base);
  delete c.norm_topk_prob, delete c.decoder_sparse_step;
  const spec = parseModelConfig(c);
  assert.equal(spec.layers[0].mlp.kind, "moe");
});

Deno.test("architecture data: MoE layer placement and renormalisation per model type", () => {
  const deepseek = parseModelConfig({
    model_type: "deepseek",
    hidden_size: 8,
    num_attention_heads: 2,
    num_hidden_layers: 6,
    n_routed_experts: 4,
    num_experts_per_tok: 2,
    first_k_dense_replace: 1,
    moe_layer_freq: 2,
    n_shared_experts: 2,
    moe_intermediate_size: 3,
    norm_topk_prob: true,
  });
  assert.deepEqual(deepseek.layers.map((l) => l.mlp.kind), [
    "dense",
    "dense",
    "moe",
    "dense",
    "moe",
    "dense",
  ]);
  assert.deepEqual(deepseek.layers[2].mlp, {
    kind: "moe",
    experts: 4,
    topK: 2,
    expertWidth: 3,
    renorm: { normalize: true, eps: 1e-20 },
    sharedWidth: 6,
    sharedGate: false,
  });
  const qwen = parseModelConfig({
    model_type: "qwen2_moe",
    hidden_size: 8,
    num_attention_heads: 2,
    num_key_value_heads: 2,
    num_hidden_layers: 4,
    decoder_sparse_step: 2,
    mlp_only_layers: [3],
  });
  assert.deepEqual(qwen.layers.map((l) => l.mlp.kind), ["dense", "moe", "dense", "dense"]);
  assert.equal(qwen.qkvBias && !qwen.oBias, true);
  const mixtral = parseModelConfig({
    model_type: "mixtral",
    hidden_size: 8,
    num_attention_heads: 2,
    num_key_value_heads: 1,
    sliding_window: 5,
  });
  assert.equal(mixtral.layers[0].window, 5);
  assert.deepEqual((mixtral.layers[0].mlp as { renorm: unknown }).renorm, {
    normalize: true,
    eps: 0,
  });
  const olmoe = parseModelConfig({
    model_type: "olmoe",
    hidden_size: 8,
    num_attention_heads: 2,
    clip_qkv: 1.5,
  });
  assert.equal(olmoe.qkNorm, true);
  assert.equal(olmoe.qkNormPerHead, false);
  assert.equal(olmoe.clipQkv, 1.5);
  assert.equal(olmoe.eps, 1e-5);
});

Deno.test("sharded checkpoint bad inputs name the index or the shard", async () => {
  // olmoe-a in three shards, then broken in one way each.
  const sharded = async (edit: (dir: string, index: string) => Promise<void>) => {
    const src = await openCheckpoint(`${FIXTURE_ROOT}olmoe-a`);
    const names = [...src.files.keys()].sort();
    const dir = await Deno.makeTempDir({ dir: tmp });
    await Deno.copyFile(`${FIXTURE_ROOT}olmoe-a/config.json`, `${dir}/config.json`);
    const weightMap: Record<string, string> = {};
    const third = Math.ceil(names.length / 3);
    for (let i = 0; i < 3; i++) {
      const part = names.slice(i * third, (i + 1) * third);
      const file = `model-0000${i + 1}-of-00003.safetensors`;
      await writeSafetensors(
        `${dir}/${file}`,
        await Promise.all(part.map((n) => readTensor(src, n))),
      );
      for (const n of part) weightMap[n] = file;
    }
    closeCheckpoint(src);
    const index = JSON.stringify({ metadata: {}, weight_map: weightMap }, null, 2);
    await Deno.writeTextFile(`${dir}/model.safetensors.index.json`, index);
    await edit(dir, index);
    return dir;
  };
  const fine = await sharded(async () => {});
  closeCheckpoint(await openCheckpoint(fine));

  // A shard the index never names (its tensors would go unread).
  let dir = await sharded((d, index) =>
    Deno.writeTextFile(
      `${d}/model.safetensors.index.json`,
      index.replace(/"model-00002-of-00003\.safetensors"/g, '"model-00001-of-00003.safetensors"'),
    )
  );
  await assert.rejects(
    openCheckpoint(dir),
    /index\.json: names no tensor in model-00002-of-00003\.safetensors: shard 2 of 3 is missing from the index/,
  );

  // The index names a tensor twice (JSON.parse alone would keep the last silently).
  dir = await sharded((d, index) =>
    Deno.writeTextFile(
      `${d}/model.safetensors.index.json`,
      index.replace(
        '"weight_map": {',
        '"weight_map": {\n    "model.norm.weight": "model-00001-of-00003.safetensors",',
      ),
    )
  );
  await assert.rejects(
    openCheckpoint(dir),
    /index\.json: "weight_map" names tensor "model\.norm\.weight" more than once/,
  );

  // A shard that ends early.
  dir = await sharded(async (d) => {
    const path = `${d}/model-00003-of-00003.safetensors`;
    const bytes = await Deno.readFile(path);
    await Deno.writeFile(path, bytes.subarray(0, bytes.length - 100));
  });
  await assert.rejects(
    openCheckpoint(dir),
    /model-00003-of-00003\.safetensors: tensor "[^"]+": data_offsets \[\d+,\d+\] run past the end of the file .*truncated/,
  );

  // A shard file named by the index is not there.
  dir = await sharded((d) => Deno.remove(`${d}/model-00002-of-00003.safetensors`));
  await assert.rejects(
    openCheckpoint(dir),
    /index\.json: names shard model-00002-of-00003\.safetensors, which is missing/,
  );

  // A tensor stored in two shards.
  dir = await sharded(async (d) => {
    const path = `${d}/model-00003-of-00003.safetensors`;
    const f = await SafetensorsFile.open(path);
    const tensors = await Promise.all([...f.tensors.keys()].map((n) => f.read(n)));
    f.close();
    const ck = await openCheckpoint(`${FIXTURE_ROOT}olmoe-a`);
    tensors.push(await readTensor(ck, "model.embed_tokens.weight"));
    closeCheckpoint(ck);
    await writeSafetensors(path, tensors);
  });
  await assert.rejects(
    openCheckpoint(dir),
    /index\.json: tensor "model\.embed_tokens\.weight" is in both model-00001-of-00003\.safetensors and model-00003-of-00003\.safetensors/,
  );
});

Deno.test("architecture data: qwen3_moe keys and Qwen3MoeConfig's class defaults", () => {
  // Nothing but the type: every key from the class (transformers v4.51-v4.57).
  const bare = parseModelConfig({ model_type: "qwen3_moe" });
  assert.deepEqual(
    [bare.vocab, bare.hidden, bare.numLayers, bare.heads, bare.kvHeads, bare.headDim],
    [151936, 2048, 24, 32, 4, 64], // head_dim absent: hidden / heads
  );
  assert.deepEqual(
    [bare.ropeTheta, bare.ropeLinearFactor, bare.eps, bare.maxPositions, bare.tieEmbeddings],
    [10000, 1, 1e-6, 32768, false],
  );
  assert.deepEqual(
    [bare.qkNorm, bare.qkNormPerHead, bare.qkvBias, bare.oBias, bare.clipQkv],
    [true, true, false, false, null],
  );
  assert.deepEqual([bare.bosTokenId, bare.eosTokenId, bare.padTokenId], [null, null, null]);
  assert.deepEqual(bare.names.shared, null);
  for (const layer of bare.layers) {
    assert.equal(layer.window, null); // sliding_window 4096 is off without use_sliding_window
    assert.deepEqual(layer.mlp, {
      kind: "moe",
      experts: 128,
      topK: 8,
      expertWidth: 768,
      renorm: { normalize: false, eps: 0 },
      sharedWidth: 0,
      sharedGate: false,
    });
  }
  // A released model's keys: head_dim from the config, renormalised top-k, dense layers by
  // mlp_only_layers and decoder_sparse_step, biases, the window on every layer.
  const qwen3 = parseModelConfig({
    model_type: "qwen3_moe",
    hidden_size: 16,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 8,
    num_hidden_layers: 5,
    intermediate_size: 24,
    num_experts: 6,
    num_experts_per_tok: 2,
    moe_intermediate_size: 4,
    norm_topk_prob: true,
    decoder_sparse_step: 2,
    mlp_only_layers: [3],
    attention_bias: true,
    use_sliding_window: true,
    sliding_window: 7,
    max_window_layers: 2,
    rope_theta: 1e6,
    eos_token_id: [5, 6],
  });
  assert.equal(qwen3.headDim, 8);
  assert.deepEqual(qwen3.layers.map((l) => l.mlp.kind), [
    "dense",
    "moe",
    "dense",
    "dense",
    "dense",
  ]);
  assert.deepEqual(qwen3.layers[0].mlp, { kind: "dense", width: 24 });
  assert.deepEqual((qwen3.layers[1].mlp as { renorm: unknown }).renorm, {
    normalize: true,
    eps: 0,
  });
  assert.deepEqual(qwen3.layers.map((l) => l.window), [7, 7, 7, 7, 7]);
  assert.deepEqual([qwen3.qkvBias, qwen3.oBias, qwen3.ropeTheta, qwen3.eosTokenId], [
    true,
    true,
    1e6,
    5,
  ]);
  assert.equal(
    parseModelConfig({ model_type: "qwen3_moe", num_experts: 0 }).layers[0].mlp.kind,
    "dense",
  );
  // rope: "default" is no scaling, linear divides positions, transformers v5's
  // rope_parameters carries the theta; anything else is refused by name.
  const rope = (extra: Record<string, unknown>) =>
    parseModelConfig({ model_type: "qwen3_moe", ...extra }, "q3/config.json");
  assert.equal(rope({ rope_scaling: { rope_type: "default" } }).ropeLinearFactor, 1);
  assert.equal(rope({ rope_scaling: { rope_type: "linear", factor: 4 } }).ropeLinearFactor, 4);
  const v5 = rope({ rope_parameters: { rope_type: "default", rope_theta: 1e6 } });
  assert.deepEqual([v5.ropeTheta, v5.ropeLinearFactor], [1e6, 1]);
  assert.equal(rope({ rope_parameters: { rope_theta: 5e5 } }).ropeTheta, 5e5);
  const v5linear = rope({ rope_parameters: { rope_type: "linear", rope_theta: 1e6, factor: 2 } });
  assert.deepEqual([v5linear.ropeTheta, v5linear.ropeLinearFactor], [1e6, 2]);
  assert.throws(
    () =>
      rope({
        rope_scaling: { rope_type: "yarn", factor: 4, original_max_position_embeddings: 32768 },
      }),
    /^ConfigError: q3\/config\.json: rope_scaling .*"yarn".* is not supported/,
  );
  assert.throws(
    () => rope({ rope_parameters: { rope_type: "yarn", rope_theta: 1e6, factor: 4 } }),
    /q3\/config\.json: rope_scaling .*"yarn".* is not supported/,
  );
  assert.throws(() => rope({ head_dim: 7 }), /head dimension 7 \(head_dim\) must be an even/);
});
