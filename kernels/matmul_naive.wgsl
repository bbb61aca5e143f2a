// out[n, col0 + c] = sum_k x[n, k] * w[c, k] (+ bias[col0 + c]) for one row chunk of w.
// The readable baseline of the ladder: one thread per output element, a plain loop over K,
// every operand read straight from storage (no reuse between threads).

// Params, the overrides and the bindings: matmul_common.wgsl.
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
