// The full forward pass on WebGPU against the HF reference outputs: every fixture
// architecture (f32 and bf16 checkpoints) and the default model, same tolerances as CPU;
// and KV-cache decoding against recomputation.

import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import {
  cachedLogits,
  createKvCache,
  freeKvCache,
  greedyDecode,
  greedyGenerate,
  greedyGenerateNoCache,
} from "../lib/model/generate.ts";
import { closeCheckpoint, openCheckpoint, readTensor } from "../lib/io/checkpoint.ts";
import { writeSafetensors } from "../lib/io/safetensors.ts";
import { Model } from "../lib/model/model.ts";
import { mulberry32 } from "../lib/random.ts";
import { checkGolden, DEFAULT_MODEL, FIXTURE_ROOT, FIXTURES } from "./golden.ts";
import { webgpuForTests } from "./webgpu_helper.ts";
import type { WebGpuBackend } from "../lib/backend/webgpu/mod.ts";

const gpu = await webgpuForTests(); // one device for the whole file
const ignore = gpu === null;

for (const name of FIXTURES) {
  Deno.test({
    name: `webgpu forward matches the reference: ${name}`,
    ignore,
    async fn() {
      const r = await checkGolden(`${FIXTURE_ROOT}${name}`, gpu!);
      console.log(`  ${JSON.stringify(r)}`);
    },
  });
}

Deno.test({
  name: "webgpu forward matches the reference: default model tiny-deepseek-moe",
  ignore,
  async fn() {
    const r = await checkGolden(DEFAULT_MODEL, gpu!);
    console.log(`  ${JSON.stringify(r)}`);
  },
});

// With 4 KiB bindings every fixture weight (embedding [256, 64] f32 = 64 KiB: 16 chunks)
// is split into row chunks and the activations [24, 64] / logits [24, 256] are bound in
// row ranges: the chunked paths must give the same answers in a real forward pass.
const chunked = gpu?.withMaxBindingBytes(4096);
// Attention binds whole sequences, and qwen3_moe-a's (24 tokens x 128 f32 of q, 12 KiB) do
// not fit 4 KiB: it runs with 16 KiB bindings (its 64 KiB embedding, 48 KiB logits and 24
// KiB q are still split).
const chunked16 = gpu?.withMaxBindingBytes(16384);
const chunkedFor = (name: string) => name === "qwen3_moe-a" ? chunked16! : chunked!;
const bindingKiB = (name: string) => name === "qwen3_moe-a" ? 16 : 4;
for (const name of FIXTURES) {
  const kib = bindingKiB(name);
  Deno.test({
    name: `webgpu forward with ${kib} KiB bindings (chunked) matches the reference: ${name}`,
    ignore,
    async fn() {
      await checkGolden(`${FIXTURE_ROOT}${name}`, chunkedFor(name));
    },
  });
}

// Decoding with the KV cache on WebGPU (k and v written into the cache by the fused split,
// or added there after the q/k norms of OLMoE and Qwen3-MoE; attention over the cache in
// place) against full recomputation on the CPU reference: the same tokens, and logits as
// close as a forward's. With 4 KiB bindings the fixtures' caches (3 x 14 rows) exceed one
// binding and are written sequence by sequence (the default model's 5 KiB rows do not fit
// such bindings at all).
const cpuReference = new CpuBackend({ reference: true });
const cpuFast = new CpuBackend();
for (const [small, be] of [[false, () => gpu!], [true, chunkedFor]] as const) {
  for (const name of small ? FIXTURES : [...FIXTURES, "default model"]) {
    const label = small ? ` with ${bindingKiB(name)} KiB bindings` : "";
    Deno.test({
      name: `webgpu KV-cache decoding${label} matches CPU recomputation: ${name}`,
      ignore,
      async fn() {
        const dir = name === "default model" ? DEFAULT_MODEL : `${FIXTURE_ROOT}${name}`;
        const [model, reference] = [
          await Model.load(dir, be(name)),
          await Model.load(dir, cpuReference),
        ];
        try {
          const random = mulberry32(11);
          const prompts = [0, 1, 2].map(() =>
            Array.from({ length: 10 }, () => Math.floor(random() * model.spec.vocab))
          );
          const gotLogits: Float32Array[] = [], wantLogits: Float32Array[] = [];
          const got = await greedyGenerate(model, prompts, {
            maxNewTokens: 4,
            onStepLogits: (_, l) => gotLogits.push(l.slice()),
          });
          const want = await greedyGenerateNoCache(reference, prompts, {
            maxNewTokens: 4,
            onStepLogits: (_, l) => wantLogits.push(l.slice()),
          });
          assert.deepEqual(got, want);
          wantLogits.forEach((w, step) => {
            const scale = Math.max(...w.map(Math.abs));
            const err = Math.max(...w.map((v, i) => Math.abs(v - gotLogits[step][i]))) / scale;
            assert(err < 1e-4, `step ${step}: logits differ by ${err} of the largest`);
          });
        } finally {
          model.close(), reference.close();
        }
      },
    });
  }
}

/**
 * Records the backend's reads into `events` as they are made ("read N x shape", N tensors
 * in one read) and as they come back ("back"); returns the function that stops it.
 */
function watchReads(be: WebGpuBackend, events: string[]): () => void {
  const { read, readAll } = be;
  const watch = <T>(label: string, got: Promise<T>) => {
    events.push(label);
    got.then(() => events.push("back"), () => {});
    return got;
  };
  be.read = (x) => watch(`read 1 x ${x.shape}`, read.call(be, x));
  be.readAll = (xs) => watch(`read ${xs.length} x ${xs[0]?.shape}`, readAll.call(be, xs));
  return () => {
    be.read = read, be.readAll = readAll;
  };
}

// Greedy generation as evaluation runs it (no logits observer): each step's argmax stays on
// the device and feeds the next step; the ids of 8 steps come back in one read, made before
// the previous read is awaited, and only ids are read. Recomputation's tokens, also when
// sequences stop mid-way.
Deno.test({
  name: "webgpu greedy decoding keeps the argmax on the device, 8 steps a read, a read ahead",
  ignore,
  async fn() {
    for (const dir of [DEFAULT_MODEL, `${FIXTURE_ROOT}olmoe-a`, `${FIXTURE_ROOT}qwen2_moe-a`]) {
      // recomputation on the BLAS backend: the plain loops took 20 s for the default model
      const [model, reference] = [await Model.load(dir, gpu!), await Model.load(dir, cpuFast)];
      const events: string[] = [];
      let unwatch = () => {};
      try {
        const random = mulberry32(5);
        const prompts = [0, 1, 2].map(() =>
          Array.from({ length: 9 }, () => Math.floor(random() * model.spec.vocab))
        );
        const want = await greedyGenerateNoCache(reference, prompts, { maxNewTokens: 20 });
        assert.deepEqual(await greedyGenerate(model, prompts, { maxNewTokens: 20 }), want, dir);
        // sequence b stops after 3 b + 2 tokens (mid-chunk, and in the second chunk)
        const stopped = await greedyGenerate(model, prompts, {
          maxNewTokens: 20,
          shouldStop: (b, generated) => generated.length === 3 * b + 2,
        });
        assert.deepEqual(stopped, want.map((w, b) => w.slice(0, 3 * b + 2)), dir);

        const cache = createKvCache(model, 3, 9 + 20);
        const logits = await cachedLogits(model, Int32Array.from(prompts.flat()), 9, cache, true);
        unwatch = watchReads(gpu!, events);
        await greedyDecode(model, cache, logits, 20, (step, tokens) => {
          assert.deepEqual([...tokens], want.map((w) => w[step]), `${dir} step ${step}`);
          return false;
        });
        unwatch();
        freeKvCache(model, cache);
        // steps 0-7 read, 8-15 read, 0-7 back, 16-19 read, 8-15 back, 16-19 back
        const [r8, r4, b] = ["read 8 x 3", "read 4 x 3", "back"];
        assert.deepEqual(events, [r8, r8, b, r4, b, b], dir);
      } finally {
        unwatch();
        model.close(), reference.close();
      }
    }
  },
});

// An LM head with more rows than the embedding (padded vocabularies) could name an id the
// embedding lacks, so its ids go through the host, and a step waits for the one before:
// olmoe-a untied, its head the embedding plus 3 copies of row 0 (they tie with row 0 and
// never win, so the tokens are the tied model's).
Deno.test({
  name: "webgpu greedy decoding with an LM head wider than the embedding takes the host's ids",
  ignore,
  async fn() {
    const dir = await Deno.makeTempDir();
    const source = `${FIXTURE_ROOT}olmoe-a`, ckpt = await openCheckpoint(source);
    const tensors = [];
    for (const name of ckpt.files.keys()) tensors.push(await readTensor(ckpt, name));
    closeCheckpoint(ckpt);
    const embed = tensors.find((t) => t.name === "model.embed_tokens.weight")!;
    const rowBytes = embed.bytes.length / embed.shape[0];
    const head = new Uint8Array(embed.bytes.length + 3 * rowBytes);
    head.set(embed.bytes);
    for (let i = 0; i < 3; i++) {
      head.set(embed.bytes.subarray(0, rowBytes), embed.bytes.length + i * rowBytes);
    }
    tensors.push({
      ...embed,
      name: "lm_head.weight",
      shape: [embed.shape[0] + 3, embed.shape[1]],
      bytes: head,
    });
    await writeSafetensors(`${dir}/model.safetensors`, tensors);
    const config = JSON.parse(await Deno.readTextFile(`${source}/config.json`));
    await Deno.writeTextFile(
      `${dir}/config.json`,
      JSON.stringify({ ...config, tie_word_embeddings: false }),
    );
    const [padded, tied] = [await Model.load(dir, gpu!), await Model.load(source, gpu!)];
    let unwatch = () => {};
    try {
      const prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]];
      const want = await greedyGenerate(tied, prompts, { maxNewTokens: 5 });
      const events: string[] = [];
      unwatch = watchReads(gpu!, events);
      assert.deepEqual(await greedyGenerate(padded, prompts, { maxNewTokens: 5 }), want);
      assert.deepEqual(events, Array(5).fill(["read 1 x 2", "back"]).flat());
    } finally {
      unwatch();
      padded.close(), tied.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
