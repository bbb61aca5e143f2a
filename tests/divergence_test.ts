// The JS divergence of the searches against its textbook formula (a Math.log per term),
// on rows that take both of jsRow's branches for log q: ordinary spreads, where q's eps is
// negligible, and spreads of hundreds, where softmax entries fall to eps and below.

import assert from "node:assert";
import { JS_EPS, Reference } from "../lib/methods/divergence.ts";
import { mulberry32 } from "../lib/random.ts";

function softmaxPlusEps(row: Float32Array): Float64Array {
  const max = Math.max(...row);
  const e = Float64Array.from(row, (x) => Math.exp(x - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum + JS_EPS);
}

/**
 * 0.5 (sum p log p + sum q log q) - sum m log m, M = (P + Q) / 2, every log taken
 * directly, with P rounded to the f32 the Reference stores.
 */
function jsTextbook(a: Float32Array, b: Float32Array): number {
  const p = softmaxPlusEps(a).map(Math.fround), q = softmaxPlusEps(b);
  let plogp = 0, qlogq = 0, mlogm = 0;
  for (let i = 0; i < p.length; i++) {
    const m = 0.5 * (p[i] + q[i]);
    plogp += p[i] * Math.log(p[i]);
    qlogq += q[i] * Math.log(q[i]);
    mlogm += m * Math.log(m);
  }
  return 0.5 * (plogp + qlogq) - mlogm;
}

Deno.test("JS divergence per document matches the textbook formula", () => {
  const random = mulberry32(7);
  for (const [dim, spread] of [[256, 4], [257, 40], [33, 900], [5, 1]]) {
    const batch = 3, seqLen = 4, n = batch * seqLen * dim;
    const orig = Float32Array.from({ length: n }, () => (random() - 0.5) * spread);
    const cand = orig.map((x) => x + (random() - 0.5) * spread * 0.3);
    const ref = new Reference("js-hidden", dim);
    ref.add(orig, { batch, seqLen });
    const got = ref.docMeans(0, cand);
    for (let d = 0; d < batch; d++) {
      let want = 0;
      for (let t = 0; t < seqLen; t++) {
        const o = (d * seqLen + t) * dim;
        want += jsTextbook(orig.subarray(o, o + dim), cand.subarray(o, o + dim)) / seqLen;
      }
      const err = Math.abs(got[d] - want) / want;
      assert(err < 1e-9, `dim ${dim} spread ${spread} doc ${d}: ${got[d]} vs ${want} (${err})`);
    }
    // A candidate equal to the original diverges by nothing but P's f32 rounding.
    const self = ref.docMeans(0, orig);
    assert(self.every((v) => v < 1e-14), `JS(P||P) = ${self}`);
  }
});

Deno.test("JS divergence rows split between threads give the same document means", () => {
  // Above the split threshold, an odd row count, so the threads' shares differ.
  const random = mulberry32(11);
  const dim = 96, batch = 5, seqLen = 201, n = batch * seqLen * dim;
  const orig = Float32Array.from({ length: n }, () => (random() - 0.5) * 8);
  const cand = orig.map((x) => x + (random() - 0.5));
  const means = [1, 3].map((threads) => {
    const ref = new Reference("js-hidden", dim, { threads });
    ref.add(orig, { batch, seqLen });
    return ref.docMeans(0, cand);
  });
  assert.deepStrictEqual(means[1], means[0]);
});

Deno.test("JS divergence in f64 SIMD lanes agrees with the JS loop, peaked and flat rows", () => {
  // Spreads from near-uniform rows (JS ~1e-8: only absolute rounding is meaningful there) to
  // peaked ones where most q entries fall below eps (simd.wat's ln q branch); one row of
  // -3e38 entries; dims that run in lanes and one that falls back.
  const random = mulberry32(13);
  for (const [dim, spread] of [[256, 0.01], [256, 4], [128, 300], [36, 40], [30, 4]]) {
    const batch = 3, seqLen = 50, n = batch * seqLen * dim;
    const orig = Float32Array.from({ length: n }, () => (random() - 0.5) * spread);
    const cand = orig.map((x) => x + (random() - 0.5) * spread * 0.05);
    cand.fill(-3e38, 7 * dim, 7 * dim + dim / 2);
    const [simd, js] = [true, false].map((simd) => {
      const ref = new Reference("js-hidden", dim, { simd });
      ref.add(orig, { batch, seqLen });
      return ref.docMeans(0, cand);
    });
    js.forEach((want, d) => {
      const err = Math.abs(simd[d] - want);
      assert(
        err < 1e-9 * want || err < 1e-14,
        `dim ${dim} spread ${spread} doc ${d}: ${simd[d]} vs ${want} (${err})`,
      );
    });
  }
});
