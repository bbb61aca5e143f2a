// Shared by the WebGPU tests: the no-adapter policy and f16 test data.
//
// Policy: with CI=true a missing adapter is a failure (a CI runner that silently skips
// the GPU tests proves nothing). Elsewhere the tests are ignored with a loud warning.

import {
  createWebGpuBackend,
  NoWebGpuAdapterError,
  type WebGpuBackend,
} from "../lib/backend/webgpu.ts";

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
