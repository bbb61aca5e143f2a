// Shared by the WebGPU tests: the no-adapter policy, seeded inputs, f16 test data and
// error tracking against the CPU reference.
//
// Policy: with CI=true a missing adapter is a failure (a CI runner that silently skips
// the GPU tests proves nothing). Elsewhere the tests are ignored with a loud warning.

import assert from "node:assert";
import type { Backend, WeightDType } from "../lib/backend/backend.ts";
import {
  createWebGpuBackend,
  NoWebGpuAdapterError,
  type WebGpuBackend,
} from "../lib/backend/webgpu/mod.ts";
import { f32ToBf16Bits, type RawTensor } from "../lib/io/safetensors.ts";
import { mulberry32 } from "../lib/random.ts";

/**
 * The backend for a test file (create it once per file: adapter start-up is slow), or
 * null when there is no adapter outside CI. Any other error is rethrown.
 */
export async function webgpuForTests(
  create: () => Promise<WebGpuBackend> = createWebGpuBackend,
  ci: string | undefined = Deno.env.get("CI"),
): Promise<WebGpuBackend | null> {
  try {
    return await create();
  } catch (e) {
    if (!(e instanceof NoWebGpuAdapterError)) throw e;
    if (ci === "true") {
      throw new Error(`CI=true and WebGPU is unavailable, so the WebGPU tests fail: ${e.message}`);
    }
    console.warn(
      `\n!!! WARNING: WebGPU tests IGNORED: ${e.message}\n!!! (they fail instead when CI=true)\n`,
    );
    return null;
  }
}

/** Round f32 to IEEE half bits, nearest-even; overflow goes to infinity. */
export function f32ToF16Bits(x: Float32Array): Uint16Array {
  const u = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const out = new Uint16Array(x.length);
  for (let i = 0; i < u.length; i++) {
    const v = u[i];
    const sign = (v >>> 16) & 0x8000;
    const exp = (v >>> 23) & 0xff;
    const mant = v & 0x7fffff;
    if (exp === 0xff) {
      out[i] = sign | 0x7c00 | (mant ? 0x200 : 0); // inf or NaN
      continue;
    }
    const e = exp - 127 + 15; // rebiased exponent
    let r: number, rem: number, halfway: number;
    if (e >= 1) {
      // Normal: keep 10 mantissa bits; a carry out of the mantissa bumps the exponent.
      r = (e << 10) | (mant >>> 13);
      rem = mant & 0x1fff;
      halfway = 0x1000;
    } else if (e >= -10) {
      // Subnormal half: shift the implicit-one mantissa right.
      const m = mant | 0x800000, shift = 14 - e;
      r = m >>> shift;
      rem = m & ((1 << shift) - 1);
      halfway = 1 << (shift - 1);
    } else {
      out[i] = sign; // underflows to zero
      continue;
    }
    if (rem > halfway || (rem === halfway && (r & 1))) r++;
    out[i] = sign | Math.min(r, 0x7c00);
  }
  return out;
}

/** Seeded random test inputs, so a failure reproduces; each test file draws its own stream. */
export function seededInputs(seed: number) {
  const random = mulberry32(seed);
  return {
    random,
    /** Uniform in [-scale, scale). */
    randn: (n: number, scale = 1) =>
      Float32Array.from({ length: n }, () => (random() * 2 - 1) * scale),
    randInts: (n: number, limit: number) =>
      Int32Array.from({ length: n }, () => Math.floor(random() * limit)),
    /** k distinct values in [0, limit), shuffled. */
    distinctRows(k: number, limit: number): Int32Array {
      const all = Array.from({ length: limit }, (_, i) => i);
      for (let i = limit - 1; i > 0; i--) {
        const j = Math.floor(random() * (i + 1));
        [all[i], all[j]] = [all[j], all[i]];
      }
      return Int32Array.from(all.slice(0, k));
    },
  };
}

/** f32 values as a weight in `dtype` (bf16/f16 rounded to nearest-even). */
export function rawWeight(name: string, shape: number[], values: Float32Array, dtype: WeightDType) {
  const halves = dtype === "BF16" ? f32ToBf16Bits(values) : f32ToF16Bits(values);
  const bytes = dtype === "F32"
    ? new Uint8Array(values.slice().buffer)
    : new Uint8Array(halves.buffer);
  return { name, dtype, shape, bytes } as RawTensor;
}

/** Max |got - want| over max |want| (want the reference); records the worst per op in `worst`. */
export function relError(
  worst: Map<string, number>,
  op: string,
  got: Float32Array,
  want: Float32Array,
): number {
  assert.equal(got.length, want.length, `${op}: length ${got.length} != ${want.length}`);
  let maxAbs = 0, maxDiff = 0;
  for (let i = 0; i < want.length; i++) {
    assert(Number.isFinite(got[i]), `${op}: entry ${i} is ${got[i]}`);
    maxAbs = Math.max(maxAbs, Math.abs(want[i]));
    maxDiff = Math.max(maxDiff, Math.abs(got[i] - want[i]));
  }
  const err = maxAbs === 0 ? maxDiff : maxDiff / maxAbs;
  worst.set(op, Math.max(worst.get(op) ?? 0, err));
  return err;
}

// Matmul tolerance: f32 sums of up to a few hundred terms against the CPU's double sums.
export const MATMUL_TOL = 1e-5;

/**
 * be.matmul on random x [n, k], w [m, k] of `dtype` (and a bias) against `cpu`, the
 * reference: the shape must match and the relative error (recorded in `worst` under `op`)
 * stay within MATMUL_TOL.
 */
export async function checkMatmulAgainstCpu(
  be: Backend,
  cpu: Backend,
  worst: Map<string, number>,
  randn: (n: number) => Float32Array,
  op: string,
  [n, k, m]: number[],
  dtype: WeightDType,
  withBias: boolean,
) {
  const rawW = rawWeight("w", [m, k], randn(m * k), dtype);
  const rawB = withBias ? rawWeight("b", [m], randn(m), dtype) : undefined;
  const xData = randn(n * k);
  const gx = be.tensor(xData, [n, k]), cx = cpu.tensor(xData, [n, k]);
  const gw = be.uploadWeight(rawW), cw = cpu.uploadWeight(rawW);
  const gb = rawB && be.uploadWeight(rawB), cb = rawB && cpu.uploadWeight(rawB);
  const got = be.matmul(gx, gw, gb);
  assert.deepEqual([...got.shape], [n, m], `${op}: shape`);
  const err = relError(worst, op, await be.read(got), await cpu.read(cpu.matmul(cx, cw, cb)));
  assert(err <= MATMUL_TOL, `${op} ${n}x${k}x${m} bias=${withBias}: relative error ${err}`);
  be.free(got), be.free(gx), be.freeWeight(gw);
  if (gb) be.freeWeight(gb);
}
