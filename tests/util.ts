// Small deterministic helpers shared by tests.

import assert from "node:assert";
import { mulberry32 } from "../lib/random.ts";

/** Deterministic N(0,1) samples (mulberry32 + Box-Muller), so failures reproduce. */
export function randn(n: number, seed: number, std = 1): Float32Array {
  const next = mulberry32(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = Math.max(next(), 1e-12), v = next();
    out[i] = std * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }
  return out;
}

/** max |a - b| / max |b|: error relative to the largest reference value. */
export function maxRelError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let d = 0, m = 0;
  for (let i = 0; i < a.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(b[i]));
  }
  return m === 0 ? d : d / m;
}

/** got equals want bit for bit; names the first differing entry (assert's diff of large arrays runs out of memory). */
export function assertIdentical(got: Float32Array[], want: Float32Array[], label: string): void {
  assert.equal(got.length, want.length, label);
  want.forEach((w, a) => {
    const g = new Uint32Array(got[a].buffer, got[a].byteOffset, got[a].length);
    const bits = new Uint32Array(w.buffer, w.byteOffset, w.length);
    assert.equal(
      g.length,
      bits.length,
      `${label}: output ${a} has ${g.length} entries, want ${bits.length}`,
    );
    const i = bits.findIndex((b, j) => b !== g[j]);
    assert(i < 0, `${label}: output ${a} differs first at entry ${i}: ${got[a][i]} vs ${w[i]}`);
  });
}
