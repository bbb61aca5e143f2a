// out[n, col0 + c] = sum_k x[n, k] * w[c, k] (+ bias[col0 + c]) for one row chunk of w.
// The register-blocked core (tile sizes, multiply_tiles) is kernels/matmul_tiles.wgsl:
// here a_tile holds x, b_tile w. K is walked in tiles of BK; each tile of x and of w is
// loaded cooperatively in runs of 4 k-consecutive elements, weights decoded once per tile.
// Runs are vec4 loads (VEC_X / VEC_W, set by the host when the offsets and K allow it);
// ragged edges and unaligned cases use scalar loads.
//
// GROUPED (groupedMatmul): w holds a run of experts' [M, k] matrices back to back and each
// workgroup row takes its rows, matrix and column range from the tile table: one dispatch
// runs every expert of a layer.

// Params, the overrides and the bindings: matmul_common.wgsl.
// VEC_W here: f32 runs of 4 as vec4s of w4 (K a multiple of 4), f16/bf16 runs of 4 as two
// whole words of w (K even).

// x[row, kk .. kk + 3], zero past the edges.
fn load_x(row: u32, kk: u32, row_end: u32) -> vec4f {
  if (row >= row_end) {
    return vec4f(0.0);
  }
  let base = x_row_start(row) + kk;
  if (kk + 3u < p.k) {
    if (VEC_X) {
      return x4[base / 4u];
    }
    return vec4f(x[base], x[base + 1u], x[base + 2u], x[base + 3u]);
  }
  var v = vec4f(0.0);
  for (var e = 0u; e < 4u; e++) {
    if (kk + e < p.k) {
      v[e] = x[base + e];
    }
  }
  return v;
}

// w[col, kk .. kk + 3] decoded, zero past the edges.
fn load_w(col: u32, kk: u32, w_base: u32, cols: u32) -> vec4f {
  let i = w_base + col * p.k + kk;
  if (col < cols && kk + 3u < p.k && VEC_W) {
    if (W_DTYPE == DTYPE_F32) {
      return bitcast<vec4f>(w4[i / 4u]);
    }
    return vec4f(decode_pair(w[i / 2u], W_DTYPE), decode_pair(w[i / 2u + 1u], W_DTYPE));
  }
  var v = vec4f(0.0);
  for (var e = 0u; e < 4u; e++) {
    if (col < cols && kk + e < p.k) {
      v[e] = decode(w[word_index(i + e, W_DTYPE)], i + e, W_DTYPE);
    }
  }
  return v;
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
  let t = lid.y * 16u + lid.x;
  var row0 = wg.y * BM;
  var row_end = p.rows;
  var w_base = 0u; // first element of this workgroup's matrix in w
  var cols = p.cols;
  var out_col0 = p.col0;
  if (GROUPED) {
    let tile = grouped_tile(wg.y, t);
    if (tile.rows == 0u) {
      return; // past the real tiles: the grid covers the most there could be
    }
    w_base = tile.w_base;
    row0 = tile.row0;
    row_end = row0 + tile.rows;
    out_col0 = tile.col0;
    cols = tile.cols;
  }
  let col0 = wg.x * BN;
  var acc: array<vec4f, MAX_TM * TN / 4u>;
  for (var k0 = 0u; k0 < p.k; k0 += BK) {
    // Loading: the tiles are BM (BN) x BK / 4 runs of 4 k-consecutive elements; thread t
    // fetches runs t, t + 256, ...
    for (var run = t; run < BM * BK / 4u; run += 256u) {
      let r = run / (BK / 4u);
      let kq = (run % (BK / 4u)) * 4u;
      store_a_run(kq, r, load_x(row0 + r, k0 + kq, row_end));
    }
    for (var run = t; run < BN * BK / 4u; run += 256u) {
      let c = run / (BK / 4u);
      let kq = (run % (BK / 4u)) * 4u;
      store_b_run(kq, c, load_w(col0 + c, k0 + kq, w_base, cols));
    }
    workgroupBarrier();
    multiply_tiles(lid, &acc);
    workgroupBarrier();
  }
  if (SWIGLU) {
    // TN = 8: this thread's columns are one run of 4 gate columns, then the matching up run.
    for (var i = 0u; i < TM; i++) {
      let row = row0 + lid.y * TM + i;
      let block = col0 + lid.x * TN;
      if (row < row_end && block < cols) {
        for (var j = 0u; j < 4u; j++) {
          let m = (out_col0 + block) / 2u + j;
          out[p.out_off + row * p.out_stride + m] = silu_mul(acc[i * 2u][j], acc[i * 2u + 1u][j]);
        }
      }
    }
    return;
  }
  for (var i = 0u; i < TM; i++) {
    let row = row0 + lid.y * TM + i;
    for (var j = 0u; j < TN; j++) {
      let col = col0 + lid.x * TN + j;
      if (row < row_end && col < cols) {
        let m = out_col0 + col;
        var v = acc[i * (TN / 4u) + j / 4u][j % 4u];
        if (HAS_BIAS) {
          v += decode(bias[word_index(m, B_DTYPE)], m, B_DTYPE);
        }
        out[p.out_off + row * p.out_stride + m] = v;
      }
    }
  }
}
