// The CPU backend's scalar helpers: exp (lib/backend/exp.ts) against Math.exp, and the
// top-k selection routing uses.
import assert from "node:assert";
import { topKIndices } from "../lib/backend/cpu.ts";
import { exp } from "../lib/backend/exp.ts";

Deno.test("exp: within 1e-14 of Math.exp over the f32 range, Math.exp's own values outside", () => {
  let worst = 0, f32Differ = 0;
  const n = 200_000;
  for (let i = 0; i <= n; i++) {
    // every table entry and rounding boundary is crossed: steps of 180 / n < ln2 / 32
    const x = -90 + (180 * i) / n + Math.sin(i) * 1e-3;
    const want = Math.exp(x), got = exp(x);
    worst = Math.max(worst, Math.abs(got - want) / want);
    if (Math.fround(got) !== Math.fround(want)) f32Differ++;
  }
  assert(worst < 1e-14, `relative error ${worst}`);
  assert.equal(f32Differ, 0, `${f32Differ} of ${n} f32 results differ`);
  for (const x of [0, -0, 1e-300, -1e-300]) assert.equal(exp(x), 1, `exp(${x})`);
  for (const x of [NaN, Infinity, -Infinity, 700, -700, 709.7, 710, -745, -746, 1e308]) {
    assert(Object.is(exp(x), Math.exp(x)), `exp(${x}) = ${exp(x)}, Math.exp: ${Math.exp(x)}`);
  }
});

Deno.test("topKIndices: largest first, ties to the lower index, k past the length", () => {
  assert.deepEqual(topKIndices([0.1, 0.5, 0.2, 0.5, 0.9], 3), [4, 1, 3]);
  assert.deepEqual(topKIndices([1, 1, 1], 2), [0, 1]);
  assert.deepEqual(topKIndices(Float64Array.of(-3, -1, -2), 5), [1, 2, 0]);
  assert.deepEqual(topKIndices([2, 7], 0), []);
  // the same as a stable descending sort on random values
  const p = Array.from({ length: 64 }, (_, i) => Math.round(Math.sin(i * 12.9898) * 8) / 8);
  const sorted = p.map((_, i) => i).sort((a, b) => p[b] - p[a] || a - b);
  assert.deepEqual(topKIndices(p, 10), sorted.slice(0, 10));
});
