// The request types on the real default model (CPU): batching changes nothing, cached
// greedy decoding equals recomputation, truncation and rolling windows score as specified.
// Exact (bit-for-bit) claims run on the plain-loop reference backend, whose sums do not
// depend on how rows are batched; BLAS blocks differently for different row counts, so
// on the fast path the same claims hold to float rounding (checked at the end).

import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { logSoftmaxAt, ModelLM } from "../lib/eval/lm.ts";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { forward } from "../lib/model/decoder.ts";
import { greedyGenerate, greedyGenerateNoCache } from "../lib/model/generate.ts";
import { Model } from "../lib/model/model.ts";

const DIR = new URL("../data/models/tiny-deepseek-moe", import.meta.url).pathname;
const model = await Model.load(DIR, new CpuBackend({ reference: true }));
const fastModel = await Model.load(DIR, new CpuBackend());
const tokenizer = await loadTokenizer(DIR);
const bytes = (s: string) => [...new TextEncoder().encode(s)];

const requests = [
  { context: "The Congress shall", continuation: " have power" },
  { context: "We the People", continuation: " of the United States" },
  { context: "", continuation: "Fellow citizens" },
  { context: "Our economy is ", continuation: "strong" },
  { context: "Thank you.", continuation: " God bless America." },
  { context: "The state of our Union", continuation: " is strong" },
];

/** Direct scoring of one sequence: sum of log p(token) over the continuation. */
async function direct(ctx: number[], cont: number[]): Promise<number> {
  const input = [...ctx, ...cont].slice(0, -1);
  const { logits } = await forward(model, Int32Array.from(input), {
    batch: 1,
    seqLen: input.length,
  });
  let sum = 0;
  cont.forEach((
    tok,
    j,
  ) => (sum += logSoftmaxAt(logits, input.length - cont.length + j, model.spec.vocab, tok)));
  return sum;
}

Deno.test("batched loglikelihood equals unbatched, in the original order", async () => {
  const one = await new ModelLM(model, tokenizer, { batchSize: 1 }).loglikelihood(requests);
  const four = await new ModelLM(model, tokenizer, { batchSize: 4 }).loglikelihood(requests);
  assert.deepStrictEqual(four, one);
  // And both equal scoring each request alone by hand (whitespace moved, empty context -> BOS).
  assert.ok(
    Math.abs(one[0].logprob - await direct(bytes("The Congress shall"), bytes(" have power"))) <
      1e-9,
  );
  assert.ok(Math.abs(one[2].logprob - await direct([256], bytes("Fellow citizens"))) < 1e-9);
  assert.ok(
    Math.abs(one[3].logprob - await direct(bytes("Our economy is"), bytes(" strong"))) < 1e-9,
  );
  assert.ok(one.every((r) => r.logprob < 0 && !r.truncated));
});

Deno.test("is_greedy is true exactly when the continuation is the argmax path", async () => {
  const lm = new ModelLM(model, tokenizer, { batchSize: 2 });
  const prompt = bytes("The Congress of the United St");
  const [greedy] = await greedyGenerate(model, [prompt], { maxNewTokens: 4 });
  const text = new TextDecoder().decode(new Uint8Array(greedy));
  const [a, b] = await lm.loglikelihood([
    { context: "The Congress of the United St", continuation: text },
    { context: "The Congress of the United St", continuation: "orms" },
  ]);
  assert.strictEqual(a.isGreedy, true);
  assert.strictEqual(b.isGreedy, text === "orms");
});

Deno.test("contexts longer than the model are cut from the left and counted", async () => {
  const lm = new ModelLM(model, tokenizer, { maxLength: 16 });
  const ctx = "It is my duty to report on the state of the Union";
  const [r] = await lm.loglikelihood([{ context: ctx, continuation: " today" }]);
  assert.strictEqual(r.truncated, true);
  // Input = (ctx + cont)[-17:][:-1]: the last 11 context bytes condition the 6 continuation bytes.
  const whole = bytes(ctx + " today");
  assert.ok(Math.abs(r.logprob - await direct(whole.slice(-17, -6), bytes(" today"))) < 1e-9);
});

Deno.test("loglikelihood_rolling: one window equals scoring [BOS] + text; windows cover every token", async () => {
  const text = "We must act.";
  const [whole] = await new ModelLM(model, tokenizer, { maxLength: 64 }).loglikelihoodRolling([
    text,
  ]);
  assert.ok(Math.abs(whole - await direct([256], bytes(text))) < 1e-9);
  // With max length 5 the 12 bytes take windows [BOS..4], then 5 + 2 more, each
  // conditioned on the preceding tokens (make_disjoint_window).
  const [windowed] = await new ModelLM(model, tokenizer, { maxLength: 5 }).loglikelihoodRolling([
    text,
  ]);
  const t = bytes(text);
  const expected = await direct([256], t.slice(0, 5)) +
    await direct(t.slice(4, 5), t.slice(5, 10)) + await direct(t.slice(6, 10), t.slice(10, 12));
  assert.ok(Math.abs(windowed - expected) < 1e-9, `${windowed} vs ${expected}`);
});

Deno.test("KV-cache greedy decoding gives exactly the tokens and logits of full recomputation", async () => {
  const prompts = [bytes("Fellow-Citizens of"), bytes("The Congress of t")].map((p) =>
    [256, ...p].slice(0, 18)
  );
  const cached: Float32Array[] = [], full: Float32Array[] = [];
  const a = await greedyGenerate(model, prompts, {
    maxNewTokens: 6,
    onStepLogits: (_, l) => cached.push(l.slice()),
  });
  const b = await greedyGenerateNoCache(model, prompts, {
    maxNewTokens: 6,
    onStepLogits: (_, l) => full.push(l.slice()),
  });
  assert.deepStrictEqual(a, b);
  assert.strictEqual(cached.length, full.length);
  cached.forEach((l, i) => assert.deepStrictEqual(l, full[i]));
  assert.deepStrictEqual(await greedyGenerate(model, prompts, { maxNewTokens: 0 }), [[], []]);
});

Deno.test("generate_until stops at the stop string and keeps the request order", async () => {
  const lm = new ModelLM(model, tokenizer, { batchSize: 4, maxLength: 64 });
  const contexts = ["Fellow citizens, the", "We the Peop", "The Union"];
  const outs = await lm.generateUntil(
    contexts.map((context) => ({ context, until: [" "], maxGenToks: 8 })),
  );
  for (const [i, ctx] of contexts.entries()) {
    const [ref] = await greedyGenerateNoCache(model, [bytes(ctx)], { maxNewTokens: 8 });
    const text = new TextDecoder().decode(new Uint8Array(ref)).split(" ")[0];
    assert.strictEqual(outs[i], text);
  }
});

Deno.test("BLAS path: batching and the KV cache change results only by float rounding", async () => {
  const one = await new ModelLM(fastModel, tokenizer, { batchSize: 1 }).loglikelihood(requests);
  const four = await new ModelLM(fastModel, tokenizer, { batchSize: 4 }).loglikelihood(requests);
  const exact = await new ModelLM(model, tokenizer, { batchSize: 1 }).loglikelihood(requests);
  for (let i = 0; i < requests.length; i++) {
    assert.strictEqual(four[i].isGreedy, one[i].isGreedy);
    assert.ok(Math.abs(four[i].logprob - one[i].logprob) < 1e-4 * Math.abs(one[i].logprob));
    assert.ok(Math.abs(one[i].logprob - exact[i].logprob) < 1e-4 * Math.abs(exact[i].logprob));
  }
  const prompts = [bytes("Fellow-Citizens of"), bytes("The Congress of t")].map((p) =>
    [256, ...p].slice(0, 18)
  );
  assert.deepStrictEqual(
    await greedyGenerate(fastModel, prompts, { maxNewTokens: 6 }),
    await greedyGenerateNoCache(fastModel, prompts, { maxNewTokens: 6 }),
  );
});
