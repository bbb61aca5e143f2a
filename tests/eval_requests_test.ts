import assert from "node:assert";
import {
  encodePair,
  encodeRequest,
  getRollingTokenWindows,
  makeDisjointWindow,
  modelInput,
  prefixTokenId,
} from "../lib/eval/requests.ts";
import {
  meanStderr,
  multipleChoiceScores,
  pooledSampleStderr,
  pyLen,
} from "../lib/eval/metrics.ts";
import { PyRandom } from "../lib/eval/pyrandom.ts";
import { hellaswagPreprocess, pyCapitalize } from "../lib/eval/tasks.ts";

const bytes = (s: string) => [...new TextEncoder().encode(s)];
// A word-level tokenizer where a leading space belongs to the word (like GPT-2 BPE).
const vocab = new Map<string, number>();
const words = (s: string) =>
  [...s.matchAll(/\s*\S+|\s+$/g)].map((m) => {
    if (!vocab.has(m[0])) vocab.set(m[0], vocab.size);
    return vocab.get(m[0])!;
  });

Deno.test("encodePair moves the context's trailing whitespace to the continuation", () => {
  const { context, continuation } = encodePair(words, "Question: x\nAnswer: ", "yes");
  assert.deepStrictEqual(context, words("Question: x\nAnswer:"));
  assert.deepStrictEqual(continuation, [vocab.get(" yes")]);
  const b = encodePair(bytes, "Answer:  ", "no");
  assert.deepStrictEqual(b.context, bytes("Answer:"));
  assert.deepStrictEqual(b.continuation, bytes("  no"));
});

Deno.test("continuation tokens are whole[len(ctx):]", () => {
  // A tokenizer that merges "ab" shows the harness's rule: the context's tokens are
  // re-encoded alone and the continuation is what follows them in the whole encoding.
  const merging = (s: string) => [...s.replaceAll("ab", "X")].map((c) => c.charCodeAt(0));
  const r = encodePair(merging, "xxa", "bcd");
  assert.deepStrictEqual(r.context, merging("xxa"));
  assert.deepStrictEqual(r.continuation, merging("xxXcd").slice(3));
});

Deno.test("empty context becomes the prefix token (BOS, else EOS)", () => {
  assert.strictEqual(prefixTokenId(256, 257), 256);
  assert.strictEqual(prefixTokenId(null, 257), 257);
  assert.throws(() => prefixTokenId(null, null));
  const r = encodeRequest(bytes, 256, "", " hello");
  assert.deepStrictEqual(r.context, [256]);
  assert.deepStrictEqual(r.continuation, bytes(" hello"));
});

Deno.test("model input is (ctx + cont)[-(max+1):][:-1] with left truncation", () => {
  assert.deepStrictEqual(modelInput([1, 2, 3], [4, 5], 10), {
    input: [1, 2, 3, 4],
    truncated: false,
  });
  assert.deepStrictEqual(modelInput([1, 2, 3], [4, 5], 3), { input: [2, 3, 4], truncated: true });
  assert.deepStrictEqual(modelInput([1, 2, 3], [4, 5], 4), {
    input: [1, 2, 3, 4],
    truncated: false,
  });
});

Deno.test("rolling windows: hand-worked, context_len 1 (loglikelihood_rolling)", () => {
  const w = getRollingTokenWindows([1, 2, 3, 4, 5], 0, 2, 1);
  assert.deepStrictEqual(w, [[[0, 1], [1, 2]], [[2, 3], [3, 4]], [[3, 4], [5]]]);
  assert.deepStrictEqual(w.map(makeDisjointWindow), [[[0], [1, 2]], [[2], [3, 4]], [[3, 4], [5]]]);
  // Every token is predicted exactly once.
  assert.deepStrictEqual(w.flatMap((x) => x[1]), [1, 2, 3, 4, 5]);
  // A text shorter than the window is one window.
  assert.deepStrictEqual(getRollingTokenWindows([7, 8], 0, 4, 1), [[[0, 7], [7, 8]]]);
  assert.deepStrictEqual(getRollingTokenWindows([], 0, 4, 1), []);
});

Deno.test("rolling windows: hand-worked, context_len 2", () => {
  const w = getRollingTokenWindows([1, 2, 3, 4, 5], 0, 3, 2);
  assert.deepStrictEqual(w, [[[0, 1, 2], [1, 2, 3]], [[2, 3, 4], [4, 5]]]);
  assert.deepStrictEqual(makeDisjointWindow(w[1]), [[2, 3], [4, 5]]);
});

Deno.test("acc, acc_norm (characters) and stderr on a hand-computed example", () => {
  const docs = [
    { lls: [-1, -2], choices: ["a", "bbb"], gold: 1 }, // acc 0; norm -1 vs -0.667 -> 1
    { lls: [-3, -4], choices: ["cc", "d"], gold: 0 }, // acc 1; norm -1.5 vs -4 -> 1
    { lls: [-5, -1], choices: ["e", "f"], gold: 0 }, // acc 0; norm 0
  ];
  const s = docs.map((d) => multipleChoiceScores(d.lls, d.choices, d.gold));
  assert.deepStrictEqual(s.map((x) => x.acc), [0, 1, 0]);
  assert.deepStrictEqual(s.map((x) => x.acc_norm), [1, 1, 0]);
  // sample variance of [0,1,0] is 1/3, so stderr = sqrt(1/3)/sqrt(3) = 1/3
  assert.ok(Math.abs(meanStderr([0, 1, 0]) - 1 / 3) < 1e-12);
  assert.strictEqual(pyLen("né😀"), 3);
});

Deno.test("pooled stderr equals the stderr of the concatenated samples", () => {
  const a = [1, 0, 1, 1], b = [0, 0, 1];
  const mu = 4 / 7;
  const pooled = pooledSampleStderr([meanStderr(a), meanStderr(b)], [4, 3]);
  // Pooled variance ignores the between-group term, so it is close to but not the total.
  assert.ok(Math.abs(pooled - meanStderr([...a, ...b])) < 0.03, `${pooled} ${mu}`);
  assert.ok(Math.abs(pooledSampleStderr([meanStderr(a)], [4]) - meanStderr(a)) < 1e-12);
});

Deno.test("PyRandom reproduces CPython random.Random(1234)", () => {
  // python3 -c "import random; r=random.Random(1234); print(r.sample(range(100),5), ...)"
  const r = new PyRandom(1234), p = Array.from({ length: 100 }, (_, i) => i);
  assert.deepStrictEqual(r.sample(p, 5), [99, 56, 14, 0, 11]);
  assert.deepStrictEqual(r.sample(p, 5), [74, 4, 85, 88, 10]);
  assert.deepStrictEqual(new PyRandom(1234).sample(p.slice(0, 10), 3), [7, 1, 0]);
  assert.strictEqual(new PyRandom(42).random(), 0.6394267984578837);
});

Deno.test("HellaSwag preprocess and Python capitalize", () => {
  assert.strictEqual(
    hellaswagPreprocess(" Making a cake [title] Mix the flour.  [step] Stir well "),
    "Making a cake. Mix the flour.  Stir well", // as Python: 3 spaces -> 2
  );
  assert.strictEqual(pyCapitalize("then THE man"), "Then the man");
});
