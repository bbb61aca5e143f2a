import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { greedyGenerate, greedyGenerateNoCache } from "../lib/model/generate.ts";
import { Model } from "../lib/model/model.ts";
import { mulberry32 } from "../lib/random.ts";
import { checkGolden, DEFAULT_MODEL, FIXTURE_ROOT, FIXTURES } from "./golden.ts";

// The CPU paths: the plain reference loops, the default (BLAS when present) and the
// WebAssembly matmul (the default without BLAS).
for (
  const [label, backend] of [
    ["reference", new CpuBackend({ reference: true })],
    ["blas", new CpuBackend()],
    ["wasm", new CpuBackend({ wasmMatmul: true })],
  ] as const
) {
  for (const name of FIXTURES) {
    Deno.test(`cpu (${label}) forward matches the reference: ${name}`, async () => {
      await checkGolden(`${FIXTURE_ROOT}${name}`, backend);
    });
  }
  Deno.test(`cpu (${label}) forward matches the reference: default model tiny-deepseek-moe`, async () => {
    await checkGolden(DEFAULT_MODEL, backend);
  });
}

// KV-cache decoding of every fixture architecture (the q/k norms of OLMoE and Qwen3-MoE
// sit between the projection and the cache) against full recomputation: on the reference
// loops the same tokens and bit-identical logits.
for (const name of FIXTURES) {
  Deno.test(`cpu KV-cache greedy decoding equals recomputation: ${name}`, async () => {
    const model = await Model.load(`${FIXTURE_ROOT}${name}`, new CpuBackend({ reference: true }));
    try {
      const random = mulberry32(13);
      const prompts = [0, 1, 2].map(() =>
        Array.from({ length: 7 }, () => Math.floor(random() * model.spec.vocab))
      );
      const cached: Float32Array[] = [], full: Float32Array[] = [];
      const got = await greedyGenerate(model, prompts, {
        maxNewTokens: 5,
        onStepLogits: (_, l) => cached.push(l.slice()),
      });
      const want = await greedyGenerateNoCache(model, prompts, {
        maxNewTokens: 5,
        onStepLogits: (_, l) => full.push(l.slice()),
      });
      assert.deepStrictEqual(got, want);
      assert.deepStrictEqual(cached, full);
    } finally {
      model.close();
    }
  });
}
