// Backward of out = x @ w^T, register-blocked: the core of kernels/matmul_tiles.wgsl
// (128 x 128 output tiles, 8 x 8 accumulators a thread) with the loads of each gradient.
// Params and the bindings: matmul_backward_common.wgsl. Loads are 4 consecutive elements
// along the output's rows or columns, zero past the edges; a thread may load from any
// offset, so no alignment is assumed.

// dy[r, col0 + c .. + 3] (this dispatch's row r, weight rows c ..), zero past row_end
// and cols.
fn load_dy_run(r: u32, c: u32, row_end: u32, col0: u32, cols: u32) -> vec4f {
  var v = vec4f(0.0);
  if (r < row_end) {
    let base = p.dy_off + r * p.dy_stride + col0 + c;
    for (var e = 0u; e < 4u; e++) {
      if (c + e < cols) {
        v[e] = dy[base + e];
      }
    }
  }
  return v;
}

// dx[r, i] (+)= sum_c dy[r, col0 + c] * w[c, i]: dx [rows, k] = dy band [rows, cols] @ w
// chunk [cols, k]. a_tile holds dy (output rows r), b_tile w (output columns i); the
// reduction walks the chunk's rows c. GROUPED: each workgroup's rows, matrix and rows of
// it come from its tile; the tile that starts a matrix writes, one in a later weight
// chunk adds.
@compute @workgroup_size(16, 16)
fn input_grad(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
  let t = lid.y * 16u + lid.x;
  var row0 = wg.y * BM;
  var row_end = p.rows;
  var w_base = 0u; // first element of this workgroup's weight rows in w
  var col0 = p.col0;
  var cols = p.cols;
  var accumulate = p.accumulate == 1u;
  if (GROUPED) {
    let tile = grouped_tile(wg.y, t);
    if (tile.rows == 0u) {
      return; // past the real tiles: the grid covers the most there could be
    }
    row0 = tile.row0;
    row_end = row0 + tile.rows;
    w_base = tile.w_base;
    col0 = tile.col0;
    cols = tile.cols;
    accumulate = tile.col0 > 0u;
  }
  let i0 = wg.x * BN;
  var acc: array<vec4f, MAX_TM * TN / 4u>;
  for (var c0 = 0u; c0 < cols; c0 += BK) {
    // dy: BM rows x BK / 4 runs of 4 consecutive c, scattered into the reduction-major tile.
    for (var run = t; run < BM * BK / 4u; run += 256u) {
      let r = run / (BK / 4u);
      let cq = (run % (BK / 4u)) * 4u;
      store_a_run(cq, r, load_dy_run(row0 + r, c0 + cq, row_end, col0, cols));
    }
    // w: BK rows x BN / 4 runs of 4 consecutive i, each one vec4 of the tile.
    for (var run = t; run < BK * BN / 4u; run += 256u) {
      let kk = run / (BN / 4u);
      let i = (run % (BN / 4u)) * 4u;
      var v = vec4f(0.0);
      if (c0 + kk < cols) {
        let base = w_base + (c0 + kk) * p.k + i0 + i;
        for (var e = 0u; e < 4u; e++) {
          if (i0 + i + e < p.k) {
            v[e] = decode(w[word_index(base + e, W_DTYPE)], base + e, W_DTYPE);
          }
        }
      }
      b_tile[kk][i / 4u] = v;
    }
    workgroupBarrier();
    multiply_tiles(lid, &acc);
    workgroupBarrier();
  }
  for (var ii = 0u; ii < TM; ii++) {
    let row = row0 + lid.y * TM + ii;
    for (var j = 0u; j < TN; j++) {
      let i = i0 + lid.x * TN + j;
      if (row < row_end && i < p.k) {
        let o = p.out_off + row * p.k + i;
        let v = acc[ii * (TN / 4u) + j / 4u][j % 4u];
        if (accumulate) {
          dx[o] += v;
        } else {
          dx[o] = v;
        }
      }
    }
  }
}

// dW[col0 + c, i] += sum_r dy[r, col0 + c] * x[r, i]: dW band [cols, k] += dy band^T @ x.
// a_tile holds dy (output rows c), b_tile x (output columns i); the reduction walks the
// rows r. Every dW entry has one writer, and successive row chunks of dy / x are ordered
// dispatches.
@compute @workgroup_size(16, 16)
fn weight_grad(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
  let t = lid.y * 16u + lid.x;
  let c0 = wg.y * BM;
  let i0 = wg.x * BN;
  var acc: array<vec4f, MAX_TM * TN / 4u>;
  for (var r0 = 0u; r0 < p.rows; r0 += BK) {
    // Both operands: BK rows x BM / 4 (BN / 4) runs of 4 consecutive columns, each one vec4
    // of a tile.
    for (var run = t; run < BK * BM / 4u; run += 256u) {
      let kk = run / (BM / 4u);
      let c = (run % (BM / 4u)) * 4u;
      a_tile[kk][c / 4u] = load_dy_run(r0 + kk, c0 + c, p.rows, p.col0, p.cols);
    }
    for (var run = t; run < BK * BN / 4u; run += 256u) {
      let kk = run / (BN / 4u);
      let i = (run % (BN / 4u)) * 4u;
      var v = vec4f(0.0);
      if (r0 + kk < p.rows) {
        let base = p.x_off + (r0 + kk) * p.k + i0 + i;
        for (var e = 0u; e < 4u; e++) {
          if (i0 + i + e < p.k) {
            v[e] = x[base + e];
          }
        }
      }
      b_tile[kk][i / 4u] = v;
    }
    workgroupBarrier();
    multiply_tiles(lid, &acc);
    workgroupBarrier();
  }
  for (var ii = 0u; ii < TM; ii++) {
    let c = c0 + lid.y * TM + ii;
    for (var j = 0u; j < TN; j++) {
      let i = i0 + lid.x * TN + j;
      if (c < p.cols && i < p.k) {
        dw[p.out_off + c * p.k + i] += acc[ii * (TN / 4u) + j / 4u][j % 4u];
      }
    }
  }
}
