// Backward of out = x @ w^T (+ bias), the simple rung: the same 16x16 shared-memory
// tiling as matmul.wgsl, each workgroup owning a 16x16 tile of its output and walking the
// reduction dimension in steps of 16, one load per thread. Params and the bindings:
// matmul_backward_common.wgsl.

const TILE: u32 = 16u;
var<workgroup> a_tile: array<array<f32, 16>, 16>;
var<workgroup> b_tile: array<array<f32, 16>, 16>;

// dx[r, i] (+)= sum_c dy[r, col0 + c] * w[c, i]: dx [rows, k] = dy band [rows, cols] @ w
// chunk [cols, k]. Thread (lid.y, lid.x) = (row, i) of a 16x16 dx tile; the loop walks c.
@compute @workgroup_size(16, 16)
fn input_grad(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
  let row = wg.y * TILE + lid.y;
  let i = wg.x * TILE + lid.x;
  var acc = 0.0;
  for (var c0 = 0u; c0 < p.cols; c0 += TILE) {
    // a_tile[row][c] = dy[row, col0 + c0 + lid.x]; b_tile[c][i] = w[c0 + lid.y, i]
    var dv = 0.0;
    if (row < p.rows && c0 + lid.x < p.cols) {
      dv = dy[p.dy_off + row * p.dy_stride + p.col0 + c0 + lid.x];
    }
    var wv = 0.0;
    if (c0 + lid.y < p.cols && i < p.k) {
      let e = (c0 + lid.y) * p.k + i;
      wv = decode(w[word_index(e, W_DTYPE)], e, W_DTYPE);
    }
    a_tile[lid.y][lid.x] = dv;
    b_tile[lid.y][lid.x] = wv;
    workgroupBarrier();
    for (var t = 0u; t < TILE; t++) {
      acc += a_tile[lid.y][t] * b_tile[t][lid.x];
    }
    workgroupBarrier();
  }
  if (row < p.rows && i < p.k) {
    let o = p.out_off + row * p.k + i;
    if (p.accumulate == 1u) {
      dx[o] += acc;
    } else {
      dx[o] = acc;
    }
  }
}

// dW[col0 + c, i] += sum_r dy[r, col0 + c] * x[r, i]: dW band [cols, k] += dy band^T @ x.
// Thread (lid.y, lid.x) = (c, i) of a 16x16 dW tile; the loop walks the rows r. Every dW
// entry has one writer, and successive row chunks of dy/x are ordered dispatches.
@compute @workgroup_size(16, 16)
fn weight_grad(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) lid: vec3u) {
  let c = wg.y * TILE + lid.y;
  let i = wg.x * TILE + lid.x;
  let c_load = wg.y * TILE + lid.x; // the dy column this thread loads
  var acc = 0.0;
  for (var r0 = 0u; r0 < p.rows; r0 += TILE) {
    // a_tile[r][c] = dy[r0 + lid.y, col0 + c_load]; b_tile[r][i] = x[r0 + lid.y, i]
    let r = r0 + lid.y;
    var dv = 0.0;
    if (r < p.rows && c_load < p.cols) {
      dv = dy[p.dy_off + r * p.dy_stride + p.col0 + c_load];
    }
    var xv = 0.0;
    if (r < p.rows && i < p.k) {
      xv = x[p.x_off + r * p.k + i];
    }
    a_tile[lid.y][lid.x] = dv;
    b_tile[lid.y][lid.x] = xv;
    workgroupBarrier();
    for (var t = 0u; t < TILE; t++) {
      acc += a_tile[t][lid.y] * b_tile[t][lid.x];
    }
    workgroupBarrier();
  }
  if (c < p.cols && i < p.k) {
    dw[p.out_off + c * p.k + i] += acc;
  }
}

@group(0) @binding(2) var<storage, read_write> db: array<f32>; // [M]

// bias grad[c] += sum_r dy[r, c], one thread per column c < cols (= M) looping over the
// rows of this chunk: a column sum has one owner, so no atomics and a fixed order.
@compute @workgroup_size(64)
fn bias_grad(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
             @builtin(local_invocation_id) lid: vec3u) {
  let c = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (c >= p.cols) {
    return;
  }
  var acc = 0.0;
  for (var r = 0u; r < p.rows; r++) {
    acc += dy[p.dy_off + r * p.dy_stride + c];
  }
  db[c] += acc;
}
