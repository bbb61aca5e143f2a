// Finite-difference checking for the backward ops and the model backward: perturb one
// f32 input entry at a time by +-h, evaluate a scalar loss in doubles, and compare the
// central difference with the analytic gradient. The forward ops store f32, so the
// loss carries ~1e-7 relative rounding noise: with h = 1e-2 the central difference is
// good to ~1e-4 relative, far below the O(1) error of a wrong index or factor.

/** Central-difference gradient of loss() with respect to every entry of `x` (listed in `entries`). */
export async function finiteDifference(
  x: Float32Array,
  loss: () => Promise<number>,
  h = 1e-2,
  entries: Iterable<number> = x.keys(),
): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  for (const i of entries) {
    const orig = x[i];
    x[i] = orig + h;
    const up = x[i];
    const lp = await loss();
    x[i] = orig - h;
    const down = x[i];
    const lm = await loss();
    x[i] = orig;
    // the f32 steps actually taken, not the nominal 2h
    out.set(i, (lp - lm) / (up - down));
  }
  return out;
}

/** max |fd - analytic| over the checked entries / max |analytic| over the whole gradient. */
export function fdError(fd: Map<number, number>, analytic: ArrayLike<number>): number {
  let d = 0, m = 0;
  for (const [i, g] of fd) d = Math.max(d, Math.abs(g - analytic[i]));
  for (let i = 0; i < analytic.length; i++) m = Math.max(m, Math.abs(analytic[i]));
  return m === 0 ? d : d / m;
}

/** sum_i r_i y_i in doubles: the scalar whose gradient with respect to y is r. */
export function dotLoss(y: ArrayLike<number>, r: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < y.length; i++) s += y[i] * r[i];
  return s;
}
