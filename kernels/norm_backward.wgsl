// Backward of RMSNorm y = w * x * inv, inv = 1 / sqrt(mean(x^2) + eps), x [rows, cols]:
//   dx_i = inv * w_i * dy_i - inv^3 * x_i * sum_j(w_j dy_j x_j) / cols
//   dw_i += sum over rows of dy_i * x_i * inv

struct Params {
  rows: u32,
  cols: u32,
  eps: f32,
  x_off: u32, // the f32 tensors are bound from aligned offsets; these skip to row 0
  dy_off: u32,
  out_off: u32,
  inv_off: u32,
}

override W_DTYPE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, cols]
@group(0) @binding(2) var<storage, read> dy: array<f32>; // [rows, cols]
@group(0) @binding(3) var<storage, read> w: array<u32>; // [cols] in W_DTYPE
@group(0) @binding(4) var<storage, read_write> dx: array<f32>; // [rows, cols]
@group(0) @binding(5) var<storage, read_write> inv_out: array<f32>; // [rows]

const THREADS: u32 = 256u;
var<workgroup> ss_part: array<f32, 256>;
var<workgroup> dot_part: array<f32, 256>;

// One workgroup per row (as the forward): 256 threads reduce sum(x^2) and
// sum(w dy x) in shared memory, then write the row of dx. inv is kept per row for the
// weight-gradient pass.
@compute @workgroup_size(256)
fn rms_norm_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                     @builtin(local_invocation_id) lid: vec3u) {
  let row = wg.y * nwg.x + wg.x;
  // Uniform control flow: every thread of a workgroup shares `row`.
  if (row >= p.rows) {
    return;
  }
  let xb = p.x_off + row * p.cols;
  let db = p.dy_off + row * p.cols;
  var ss = 0.0;
  var dot = 0.0;
  for (var i = lid.x; i < p.cols; i += THREADS) {
    let xv = x[xb + i];
    ss += xv * xv;
    dot += decode(w[word_index(i, W_DTYPE)], i, W_DTYPE) * dy[db + i] * xv;
  }
  ss_part[lid.x] = ss;
  dot_part[lid.x] = dot;
  workgroupBarrier();
  for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
    if (lid.x < stride) {
      ss_part[lid.x] += ss_part[lid.x + stride];
      dot_part[lid.x] += dot_part[lid.x + stride];
    }
    workgroupBarrier();
  }
  let inv = 1.0 / sqrt(ss_part[0] / f32(p.cols) + p.eps);
  let c = inv * inv * inv * dot_part[0] / f32(p.cols);
  for (var i = lid.x; i < p.cols; i += THREADS) {
    let wi = decode(w[word_index(i, W_DTYPE)], i, W_DTYPE);
    dx[p.out_off + row * p.cols + i] = inv * wi * dy[db + i] - c * x[xb + i];
  }
  if (lid.x == 0u) {
    inv_out[p.inv_off + row] = inv;
  }
}

@group(0) @binding(3) var<storage, read> inv_in: array<f32>; // [rows]
@group(0) @binding(4) var<storage, read_write> wgrad: array<f32>; // [cols]

// dw[i] += sum_r dy[r, i] * x[r, i] * inv[r]: one thread per column looping over the rows
// of this chunk, so each entry has a single writer and a fixed summation order.
@compute @workgroup_size(64)
fn rms_norm_weight_grad(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                        @builtin(local_invocation_id) lid: vec3u) {
  let i = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (i >= p.cols) {
    return;
  }
  var acc = 0.0;
  for (var r = 0u; r < p.rows; r++) {
    acc += dy[p.dy_off + r * p.cols + i] * x[p.x_off + r * p.cols + i] * inv_in[p.inv_off + r];
  }
  wgrad[i] += acc;
}
