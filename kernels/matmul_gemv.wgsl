// out[n, col0 + c] = sum_k x[n, k] * w[c, k] (+ bias[col0 + c]) for one row chunk of w,
// the decode path: few rows of x, so every weight is used by at most ROWS rows and the
// kernel is bound by reading the weights once. A workgroup owns COLS output columns for
// up to ROWS rows; LANES threads share each column's K: lane l reads the column's weight
// units l, l + LANES, ... so neighbouring threads read neighbouring 16-byte runs, and the
// lanes' partial sums meet in a workgroup-memory tree reduction. (subgroupAdd would save
// the tree's barriers, but needs the "subgroups" feature, which llvmpipe does not offer;
// this tree is the portable path.) LANES x COLS: 8 x 32 ran 2.5-4.5x faster than 64 x 4
// on llvmpipe (1 to 4 rows, K 128 to 2048: fewer barrier steps, more work per lane); on a
// GPU the 8 lanes of a column still read 128 contiguous bytes a step, whole cache lines.
// Params, the overrides and the bindings: matmul_common.wgsl.
// VEC_W here: K a multiple of the vec4 unit (4 f32 or 8 f16/bf16 elements), else one
// element at a time.

const LANES: u32 = 8u; // threads per column
const COLS: u32 = 32u; // columns per workgroup
const MAX_ROWS: u32 = 8u;
// Rows of x per workgroup, 1 .. MAX_ROWS, set by the host to min(N, MAX_ROWS) so that one
// row does one row's work; more rows take more workgroups.
override ROWS: u32 = MAX_ROWS;
var<workgroup> partial: array<array<f32, 256>, MAX_ROWS>; // [row][column * LANES + lane]

// x[base .. base + 3], base a multiple of 4 when VEC_X.
fn x_run(base: u32) -> vec4f {
  if (VEC_X) {
    return x4[base / 4u];
  }
  return vec4f(x[base], x[base + 1u], x[base + 2u], x[base + 3u]);
}

@compute @workgroup_size(256)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) nwg: vec3u,
  @builtin(local_invocation_index) t: u32,
) {
  // Flat workgroup index (the host spreads large counts over a 2-D grid).
  let flat = wg.y * nwg.x + wg.x;
  let col_groups = (p.cols + COLS - 1u) / COLS;
  var row0 = (flat / col_groups) * ROWS;
  let lane = t % LANES;
  let col = (flat % col_groups) * COLS + t / LANES;
  var nrows = 0u;
  var w_base = 0u; // first element of this workgroup's matrix in w
  var cols = p.cols;
  var out_col0 = p.col0;
  if (GROUPED) {
    let tile = grouped_tile(flat / col_groups, t);
    // Workgroups past the real tiles (the grid covers the most there could be) return
    // together, before any barrier.
    if (tile.rows == 0u) {
      return;
    }
    w_base = tile.w_base;
    row0 = tile.row0;
    nrows = tile.rows;
    out_col0 = tile.col0;
    cols = tile.cols;
  } else {
    if (row0 >= p.rows) {
      return;
    }
    nrows = min(ROWS, p.rows - row0);
  }
  // Row loops run to the pipeline constant ROWS (rows past nrows read row 0 again and are
  // never written), so they unroll and acc stays in registers.
  var acc: array<f32, MAX_ROWS>;
  var xrow: array<u32, MAX_ROWS>; // where each row starts in x
  for (var r = 0u; r < ROWS; r++) {
    xrow[r] = x_row_start(select(row0, row0 + r, r < nrows));
  }
  if (col < cols) {
    if (VEC_W && W_DTYPE == DTYPE_F32) {
      for (var u = lane; u < p.k / 4u; u += LANES) {
        let wv = bitcast<vec4f>(w4[(w_base + col * p.k) / 4u + u]);
        for (var r = 0u; r < ROWS; r++) {
          acc[r] += dot(wv, x_run(xrow[r] + u * 4u));
        }
      }
    } else if (VEC_W) {
      // 8 f16/bf16 elements a load: four words, decoded in pairs.
      for (var u = lane; u < p.k / 8u; u += LANES) {
        let words = w4[(w_base + col * p.k) / 8u + u];
        let lo = vec4f(decode_pair(words.x, W_DTYPE), decode_pair(words.y, W_DTYPE));
        let hi = vec4f(decode_pair(words.z, W_DTYPE), decode_pair(words.w, W_DTYPE));
        for (var r = 0u; r < ROWS; r++) {
          acc[r] += dot(lo, x_run(xrow[r] + u * 8u)) + dot(hi, x_run(xrow[r] + u * 8u + 4u));
        }
      }
    } else {
      for (var kk = lane; kk < p.k; kk += LANES) {
        let i = w_base + col * p.k + kk;
        let wv = decode(w[word_index(i, W_DTYPE)], i, W_DTYPE);
        for (var r = 0u; r < ROWS; r++) {
          acc[r] += wv * x[xrow[r] + kk];
        }
      }
    }
  }
  for (var r = 0u; r < nrows; r++) {
    partial[r][t] = acc[r];
  }
  // Tree over the LANES lanes of each column: 8 -> 4 -> 2 -> 1.
  for (var stride = LANES / 2u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lane < stride) {
      for (var r = 0u; r < nrows; r++) {
        partial[r][t] += partial[r][t + stride];
      }
    }
  }
  if (SWIGLU) {
    // Lane 0 of each gate column pairs it with its up column, 4 columns on (same workgroup:
    // COLS is a multiple of 8 and tiles start on whole 8-column blocks), once that
    // column's tree is done.
    workgroupBarrier();
    if (lane == 0u && col < cols && col % 8u < 4u) {
      let m = (out_col0 + col - col % 8u) / 2u + col % 8u;
      for (var r = 0u; r < nrows; r++) {
        out[p.out_off + (row0 + r) * p.out_stride + m] = silu_mul(partial[r][t], partial[r][t + 4u * LANES]);
      }
    }
    return;
  }
  if (lane == 0u && col < cols) {
    let m = out_col0 + col;
    var b = 0.0;
    if (HAS_BIAS) {
      b = decode(bias[word_index(m, B_DTYPE)], m, B_DTYPE);
    }
    for (var r = 0u; r < nrows; r++) {
      out[p.out_off + (row0 + r) * p.out_stride + m] = partial[r][t] + b;
    }
  }
}
