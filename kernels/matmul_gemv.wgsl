// out[n, col0 + c] = sum_k x[n, k] * w[c, k] (+ bias[col0 + c]) for one row chunk of w,
// the decode path: few rows of x, so every weight is used by at most ROWS rows and the
// kernel is bound by reading the weights once. A workgroup owns COLS output columns for
// up to ROWS rows; LANES threads share each column's K: lane l reads the column's weight
// units l, l + LANES, ... so neighbouring threads read neighbouring words (coalesced), and
// the lanes' partial sums meet in a workgroup-memory tree reduction. (subgroupAdd would
// save most of the tree's barriers, but needs the "subgroups" feature, which llvmpipe
// does not offer; this tree is the portable path.) LANES x COLS of 16 x 16 and 32 x 8
// measured the same as 64 x 4 on llvmpipe; 64 lanes of vec4 loads read 1 KiB of a column
// at a time, which coalesces well on a real GPU.

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
// x_off and K are multiples of 4: x is read as aligned vec4s of x4.
override VEC_X: bool = false;
// K is a multiple of the vec4 unit (4 f32 or 8 f16/bf16 elements): w is read as vec4s
// of w4. Otherwise one element at a time.
override VEC_W: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, k]
@group(0) @binding(2) var<storage, read> w: array<u32>; // [cols, k] in W_DTYPE
@group(0) @binding(3) var<storage, read> bias: array<u32>; // [M] in B_DTYPE
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // [rows, out_stride]
// The same x and w bindings seen as vec4s (a placeholder when VEC_X / VEC_W is off).
@group(0) @binding(5) var<storage, read> x4: array<vec4f>;
@group(0) @binding(6) var<storage, read> w4: array<vec4u>;
// GROUPED (groupedMatmul): w holds a run of experts' [M, k] matrices back to back; per
// tile, (first weight element, first row, row count <= ROWS, first output column,
// column count <= p.cols).
@group(0) @binding(7) var<storage, read> tiles: array<u32>;
override GROUPED: bool = false;

const LANES: u32 = 64u; // threads per column
const COLS: u32 = 4u; // columns per workgroup
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
    let tile = flat / col_groups;
    // Whole workgroups past the end return together, before any barrier.
    if (tile >= arrayLength(&tiles) / 5u) {
      return;
    }
    w_base = tiles[5u * tile];
    row0 = tiles[5u * tile + 1u];
    nrows = tiles[5u * tile + 2u];
    out_col0 = tiles[5u * tile + 3u];
    cols = tiles[5u * tile + 4u];
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
    xrow[r] = p.x_off + select(0u, (row0 + r) * p.k, r < nrows);
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
  // Tree over the LANES lanes of each column: 64 -> 32 -> ... -> 1.
  for (var stride = LANES / 2u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (lane < stride) {
      for (var r = 0u; r < nrows; r++) {
        partial[r][t] += partial[r][t + stride];
      }
    }
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
