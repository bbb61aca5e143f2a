// The searches' Jensen-Shannon divergence on the device (lib/methods/divergence.ts; the
// expert search with --backend webgpu): for each row, Q = softmax(cond row) + eps against
// the original model's P (softmax + eps, f32), out[row] = JS(P||Q). LANES threads a row,
// 64 / LANES rows a workgroup.
//
// The host computes JS as 0.5 (sum p ln p + sum q ln q) - sum m ln m in f64, where the
// terms cancel to the small result. In f32 that cancellation would leave nothing, so this
// kernel sums the same quantity in a form without it: with s = p + q and d = (p - q) / s,
// each entry's share is s g(d) / 4, g(d) = (1 + d) ln(1 + d) + (1 - d) ln(1 - d) >= 0,
// taken from its series near d = 0. What is left is q's own f32 rounding.

struct Params {
  rows: u32,
  dim: u32,
  eps: f32,
  p_off: u32, // p, cond and out are bound from aligned offsets; these skip to row 0
  cond_off: u32,
  out_off: u32,
}

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> p: array<f32>; // [rows, dim]
@group(0) @binding(2) var<storage, read> cond: array<f32>; // [rows, dim]
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // [rows]

const THREADS: u32 = 64u;
// Threads a row, a power of 2 dividing 64: the host takes fewer for narrow rows, where 64
// threads would hold a few entries each between the reductions.
override LANES: u32 = 64u;
var<workgroup> partial: array<f32, THREADS>;

// Sum (max when `take_max`) of v over the LANES threads of this thread's row.
fn reduce(v: f32, lid: u32, take_max: bool) -> f32 {
  partial[lid] = v;
  workgroupBarrier();
  let lane = lid % LANES;
  for (var half = LANES / 2u; half > 0u; half /= 2u) {
    if (lane < half) {
      let other = partial[lid + half];
      partial[lid] = select(partial[lid] + other, max(partial[lid], other), take_max);
    }
    workgroupBarrier();
  }
  let r = partial[lid - lane];
  workgroupBarrier();
  return r;
}

// g(d) = (1 + d) ln(1 + d) + (1 - d) ln(1 - d), even in d: below |d| = 1/2 its series
// sum over n >= 1 of d^(2n) / (n (2n - 1)), to the d^16 term (the rest is under 5e-7 of
// the sum); above, the logs themselves, whose sum no longer cancels.
fn js_g(d: f32) -> f32 {
  let a = abs(d);
  if (a < 0.5) {
    let t = a * a;
    let tail = 1.0 / 28.0 + t * (1.0 / 45.0 + t * (1.0 / 66.0 + t * (1.0 / 91.0 + t / 120.0)));
    return t * (1.0 + t * (1.0 / 6.0 + t * (1.0 / 15.0 + t * tail)));
  }
  let lo = 1.0 - a;
  // q or p underflowed to 0 in f32: (1 - d) ln(1 - d) -> 0
  return (1.0 + a) * log(1.0 + a) + select(0.0, lo * log(lo), lo > 0.0);
}

@compute @workgroup_size(64)
fn js_rows(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
           @builtin(local_invocation_id) lid3: vec3u) {
  let lid = lid3.x;
  let lane = lid % LANES;
  let row = (wg.y * nwg.x + wg.x) * (THREADS / LANES) + lid / LANES;
  // A row past the end idles through the reductions (every thread must reach them).
  let dim = select(0u, prm.dim, row < prm.rows);
  let c0 = prm.cond_off + row * prm.dim;
  let p0 = prm.p_off + row * prm.dim;
  var m = -3.4e38;
  for (var i = lane; i < dim; i += LANES) {
    m = max(m, cond[c0 + i]);
  }
  m = reduce(m, lid, true);
  var sum = 0.0;
  for (var i = lane; i < dim; i += LANES) {
    sum += exp(cond[c0 + i] - m);
  }
  let inv = 1.0 / reduce(sum, lid, false);
  var js = 0.0;
  for (var i = lane; i < dim; i += LANES) {
    let q = exp(cond[c0 + i] - m) * inv + prm.eps;
    let pi = p[p0 + i];
    let s = pi + q;
    js += s * js_g((pi - q) / s);
  }
  js = reduce(js, lid, false);
  if (lane == 0u && row < prm.rows) {
    out[prm.out_off + row] = 0.25 * js;
  }
}
