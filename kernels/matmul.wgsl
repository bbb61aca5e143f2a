// out[n, col0 + c] = sum_k x[n, k] * w[c, k] (+ bias[col0 + c]) for one row chunk of w.
// Classic shared-memory tiling: each 16x16 workgroup computes a 16x16 output tile and
// walks K in steps of 16, both tiles loaded cooperatively (one element per thread).

// Params, the overrides and the bindings: matmul_common.wgsl.

const TILE: u32 = 16u;
var<workgroup> x_tile: array<array<f32, 16>, 16>; // [row][k]
var<workgroup> w_tile: array<array<f32, 16>, 16>; // [col][k]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
  let row = wg.y * TILE + lid.y;
  let col = wg.x * TILE + lid.x;
  // The loads: this thread fetches x[tile row lid.y, k0 + lid.x] and w[tile col lid.y, k0 + lid.x].
  let load_x_row = row;
  let load_w_row = wg.x * TILE + lid.y;
  var acc = 0.0;
  for (var k0 = 0u; k0 < p.k; k0 += TILE) {
    let kk = k0 + lid.x;
    var xv = 0.0;
    if (load_x_row < p.rows && kk < p.k) {
      xv = x[p.x_off + load_x_row * p.k + kk];
    }
    var wv = 0.0;
    if (load_w_row < p.cols && kk < p.k) {
      let i = load_w_row * p.k + kk;
      wv = decode(w[word_index(i, W_DTYPE)], i, W_DTYPE);
    }
    x_tile[lid.y][lid.x] = xv;
    w_tile[lid.y][lid.x] = wv;
    workgroupBarrier();
    for (var t = 0u; t < TILE; t++) {
      acc += x_tile[lid.y][t] * w_tile[lid.x][t];
    }
    workgroupBarrier();
  }
  if (row < p.rows && col < p.cols) {
    let m = p.col0 + col;
    if (HAS_BIAS) {
      acc += decode(bias[word_index(m, B_DTYPE)], m, B_DTYPE);
    }
    out[p.out_off + row * p.out_stride + m] = acc;
  }
}
