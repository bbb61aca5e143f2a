// RMSNorm: out[r, i] = w[i] * (x[r, i] / sqrt(mean(x[r]^2) + eps)), one workgroup per row.

struct Params {
  rows: u32,
  cols: u32,
  eps: f32,
  x_off: u32, // x and out are bound from an aligned offset; these skip to row 0
  out_off: u32,
}

override W_DTYPE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, cols]
@group(0) @binding(2) var<storage, read> w: array<u32>; // [cols] in W_DTYPE
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // [rows, cols]

const THREADS: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn rms_norm(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_id) lid: vec3u,
) {
  let row = wg.y * nwg.x + wg.x;
  // Uniform control flow: every thread of a workgroup shares `row`, so this early exit is safe.
  if (row >= p.rows) {
    return;
  }
  let x_base = p.x_off + row * p.cols;
  let out_base = p.out_off + row * p.cols;
  var ss = 0.0;
  for (var i = lid.x; i < p.cols; i += THREADS) {
    let v = x[x_base + i];
    ss += v * v;
  }
  partial[lid.x] = ss;
  workgroupBarrier();
  for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
    if (lid.x < stride) {
      partial[lid.x] += partial[lid.x + stride];
    }
    workgroupBarrier();
  }
  let inv = 1.0 / sqrt(partial[0] / f32(p.cols) + p.eps);
  for (var i = lid.x; i < p.cols; i += THREADS) {
    out[out_base + i] = decode(w[word_index(i, W_DTYPE)], i, W_DTYPE) * (x[x_base + i] * inv);
  }
}
