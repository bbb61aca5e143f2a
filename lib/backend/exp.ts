// e^x for the CPU backend's hot loops (SwiGLU, softmax, sigmoid, the search's
// divergences): 1.7-2x as fast as Math.exp in V8, and as exact for what they compute.
//
// x = (32 n + j) ln2 / 32 + r with |r| <= ln2 / 64, so e^x = 2^n 2^(j/32) e^r, with e^r
// from its Taylor series to r^5 (remainder below 3e-15 relative) and both powers of two
// from tables; ln2 / 32 is split in two (Cody-Waite) so that r is exact to a few ulps.
// Against Math.exp over [-90, 90] (8 million points): at most 5.5e-15 relative, no f32
// rounding changed. Measured in Deno 2.9.6 on the project's 2-core machines: 8 ns against
// Math.exp's 14-20 in a loop over a Float32Array. Outside +-700 and for NaN it is Math.exp.

const LOG2E_32 = 32 * Math.LOG2E;
// ln2 / 32 = HI + LO, HI with 35 significant bits so that n * HI is exact for |n| < 2^18.
const LN2_32_HI = Math.round((Math.LN2 / 32) * 2 ** 40) / 2 ** 40;
const LN2_32_LO = (Math.LN2 - 32 * LN2_32_HI) / 32;
// k = 32 n + j is offset so that truncating it toward zero is a floor.
const OFFSET = 32 * 1024;
const POW2 = Float64Array.from({ length: 2048 }, (_, i) => Math.pow(2, i - 1024));
const POW2_32NDS = Float64Array.from({ length: 32 }, (_, j) => Math.pow(2, j / 32));

export function exp(x: number): number {
  if (!(x > -700 && x < 700)) return Math.exp(x);
  const k = (x * LOG2E_32 + (OFFSET + 0.5)) | 0; // round(x 32 / ln2) + OFFSET
  const n = k - OFFSET;
  const r = (x - n * LN2_32_HI) - n * LN2_32_LO;
  const er = 1 + r * (1 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120)))));
  return er * POW2_32NDS[k & 31] * POW2[k >> 5];
}
