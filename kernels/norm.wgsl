// RMSNorm: out[r, i] = w[i] * (x[r, i] / sqrt(mean(x[r]^2) + eps)), one workgroup per row;
// add_rms_norm first forms x = a + b (the residual add) and writes it as well.

struct Params {
  rows: u32,
  cols: u32,
  eps: f32,
  x_off: u32, // the tensors are bound from aligned offsets; these skip to row 0
  out_off: u32,
  b_off: u32, // add_rms_norm only
  sum_off: u32,
}

override W_DTYPE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, cols]
@group(0) @binding(2) var<storage, read> w: array<u32>; // [cols] in W_DTYPE
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // [rows, cols]
@group(0) @binding(4) var<storage, read> b: array<f32>; // [rows, cols], add_rms_norm
@group(0) @binding(5) var<storage, read_write> sum: array<f32>; // [rows, cols], add_rms_norm

const THREADS: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

// 1 / rms of a row from each thread's sum of squares: one tree for both entry points, so
// add_rms_norm gives bit for bit what add then rms_norm gives.
fn inv_rms(ss: f32, lid: u32) -> f32 {
  partial[lid] = ss;
  workgroupBarrier();
  for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      partial[lid] += partial[lid + stride];
    }
    workgroupBarrier();
  }
  return 1.0 / sqrt(partial[0] / f32(p.cols) + p.eps);
}

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
  let inv = inv_rms(ss, lid.x);
  for (var i = lid.x; i < p.cols; i += THREADS) {
    out[out_base + i] = decode(w[word_index(i, W_DTYPE)], i, W_DTYPE) * (x[x_base + i] * inv);
  }
}

// sum = x + b and out = rms_norm(sum): one pass over the residual stream instead of two.
@compute @workgroup_size(256)
fn add_rms_norm(
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
  let b_base = p.b_off + row * p.cols;
  let sum_base = p.sum_off + row * p.cols;
  let out_base = p.out_off + row * p.cols;
  var ss = 0.0;
  for (var i = lid.x; i < p.cols; i += THREADS) {
    let v = x[x_base + i] + b[b_base + i];
    sum[sum_base + i] = v;
    ss += v * v;
  }
  let inv = inv_rms(ss, lid.x);
  // Each thread reads back only the entries it wrote.
  for (var i = lid.x; i < p.cols; i += THREADS) {
    out[out_base + i] = decode(w[word_index(i, W_DTYPE)], i, W_DTYPE) * (sum[sum_base + i] * inv);
  }
}
