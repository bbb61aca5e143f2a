// out[n, col0 + c] = sum_k x[n, k] * w[c, k] (+ bias[col0 + c]) for one row chunk of w.
// The readable baseline of the ladder: one thread per output element, a plain loop over K,
// every operand read straight from storage (no reuse between threads).

struct Params {
  rows: u32, // N rows of x in this dispatch
  k: u32, // inner dimension
  cols: u32, // rows of this weight chunk = output columns written
  out_stride: u32, // M, the full output row width
  col0: u32, // first output column (first weight row) of this chunk
  x_off: u32, // x and out are bound from an aligned offset; these skip to row 0
  out_off: u32,
}

override W_DTYPE: u32 = 0u;
override B_DTYPE: u32 = 0u;
override HAS_BIAS: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, k]
@group(0) @binding(2) var<storage, read> w: array<u32>; // [cols, k] in W_DTYPE
@group(0) @binding(3) var<storage, read> bias: array<u32>; // [M] in B_DTYPE
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // [rows, out_stride]

// 64 x 4: a warp-wide run of columns (consecutive weight rows), 4 rows of x.
@compute @workgroup_size(64, 4)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let col = gid.x;
  let row = gid.y;
  if (row >= p.rows || col >= p.cols) {
    return;
  }
  var acc = 0.0;
  for (var kk = 0u; kk < p.k; kk++) {
    let i = col * p.k + kk;
    acc += x[p.x_off + row * p.k + kk] * decode(w[word_index(i, W_DTYPE)], i, W_DTYPE);
  }
  let m = p.col0 + col;
  if (HAS_BIAS) {
    acc += decode(bias[word_index(m, B_DTYPE)], m, B_DTYPE);
  }
  out[p.out_off + row * p.out_stride + m] = acc;
}
