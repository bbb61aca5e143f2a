// Small deterministic helpers shared by tests.

import assert from "node:assert";
import { mulberry32 } from "../lib/random.ts";
import type { Backend } from "../lib/backend/backend.ts";

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

/**
 * CPU attention on `fast` equals `reference` within 1e-5 (GQA, qLen < kvLen, a window, and a
 * decode step: one query row a head, so both products run as matrix-vector ones).
 */
export async function checkAttentionAgainst(fast: Backend, reference: Backend, label: string) {
  for (
    const s of [
      { batch: 2, qLen: 7, kvLen: 7, heads: 4, kvHeads: 2, headDim: 8, window: null },
      { batch: 1, qLen: 3, kvLen: 11, heads: 6, kvHeads: 3, headDim: 16, window: null },
      { batch: 3, qLen: 9, kvLen: 9, heads: 2, kvHeads: 1, headDim: 8, window: 4 },
      { batch: 2, qLen: 1, kvLen: 12, heads: 4, kvHeads: 2, headDim: 8, window: null },
    ]
  ) {
    const q = randn(s.batch * s.qLen * s.heads * s.headDim, 4);
    const k = randn(s.batch * s.kvLen * s.kvHeads * s.headDim, 5);
    const v = randn(s.batch * s.kvLen * s.kvHeads * s.headDim, 6);
    const outs = await Promise.all([reference, fast].map((be) =>
      be.read(be.attention(
        be.tensor(q, [s.batch * s.qLen, s.heads * s.headDim]),
        be.tensor(k, [s.batch * s.kvLen, s.kvHeads * s.headDim]),
        be.tensor(v, [s.batch * s.kvLen, s.kvHeads * s.headDim]),
        s,
      ))
    ));
    assert(
      maxRelError(outs[1], outs[0]) < 1e-5,
      `${label} ${JSON.stringify(s)}: ${maxRelError(outs[1], outs[0])}`,
    );
  }
}
