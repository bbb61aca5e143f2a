// Backward of the MoE routing and token dispatch ops (moe.wgsl).

// RouteParams, the logits and their softmax: route.wgsl (out_off: d_logits' row 0).
@group(0) @binding(2) var<storage, read> indices: array<i32>; // [rows, k]
@group(0) @binding(3) var<storage, read> d_weights: array<f32>; // [rows, k]
@group(0) @binding(4) var<storage, read_write> d_logits: array<f32>; // [rows, experts]

// One thread per token (E is small): recompute the softmax p, the gradient to the selected
// probabilities dp_s (through the renormalisation w_s = p_s / (S + eps) when normalize),
// then softmax backward dlogit_e = p_e (dp_e - sum_s p_s dp_s).
@compute @workgroup_size(64)
fn route_topk_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                       @builtin(local_invocation_id) lid: vec3u) {
  let r = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (r >= rp.rows) {
    return;
  }
  let base = rp.logits_off + r * rp.experts;
  let stats = softmax_stats(base);
  let kb = r * rp.k;
  var chosen = 0.0;
  var dot_wp = 0.0;
  for (var j = 0u; j < rp.k; j++) {
    let pj = softmax_prob(base, u32(indices[kb + j]), stats);
    chosen += pj;
    dot_wp += d_weights[kb + j] * pj;
  }
  let z = chosen + rp.eps;
  // gradient to the selected probability of slot j
  var pdp = 0.0;
  for (var j = 0u; j < rp.k; j++) {
    let pj = softmax_prob(base, u32(indices[kb + j]), stats);
    var dpj = d_weights[kb + j];
    if (rp.normalize == 1u) {
      dpj = dpj / z - dot_wp / (z * z);
    }
    pdp += pj * dpj;
  }
  for (var e = 0u; e < rp.experts; e++) {
    var dpe = 0.0;
    for (var j = 0u; j < rp.k; j++) {
      if (u32(indices[kb + j]) == e) {
        var dpj = d_weights[kb + j];
        if (rp.normalize == 1u) {
          dpj = dpj / z - dot_wp / (z * z);
        }
        dpe += dpj;
      }
    }
    let pe = softmax_prob(base, e, stats);
    d_logits[rp.out_off + r * rp.experts + e] = pe * (dpe - pdp);
  }
}

struct RowParams {
  count: u32, // selected rows in this dispatch
  cols: u32,
  row0: u32, // first row of dOut held by this binding
  chunk_rows: u32,
  first: u32, // rows[first] (and scales[first], y[first]) belong to this dispatch's row 0
  src_off: u32, // the f32 tensors are bound from aligned offsets; these skip to row 0
  other_off: u32, // dy (scaled gather) or y (scale gradient)
}

@group(0) @binding(0) var<uniform> sp: RowParams;
@group(0) @binding(1) var<storage, read> rows: array<i32>; // all selected rows
@group(0) @binding(2) var<storage, read> scales: array<f32>; // all scales
@group(0) @binding(3) var<storage, read> src: array<f32>; // dOut [chunk_rows, cols]
@group(0) @binding(4) var<storage, read_write> dy: array<f32>; // [count, cols]

// dy[i, c] = scales[i] * dOut[rows[i], c] for the rows inside this chunk of dOut: a scaled
// gather, one thread per (i, c).
@compute @workgroup_size(64)
fn scatter_rows_backward_dy(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                            @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= sp.count * sp.cols) {
    return;
  }
  let i = t / sp.cols;
  let c = t % sp.cols;
  let r = u32(rows[sp.first + i]);
  if (r >= sp.row0 && r < sp.row0 + sp.chunk_rows) {
    dy[sp.other_off + t] = scales[sp.first + i] * src[sp.src_off + (r - sp.row0) * sp.cols + c];
  }
}

@group(0) @binding(2) var<storage, read> y: array<f32>; // [count, cols]
@group(0) @binding(4) var<storage, read_write> d_scales: array<f32>; // all rows

// dScales[i] = dot(dOut[rows[i]], y[i]) for the rows inside this chunk of dOut, one thread
// per selected row i (each owns its output entry).
@compute @workgroup_size(64)
fn scatter_rows_backward_scales(@builtin(workgroup_id) wg: vec3u,
                                @builtin(num_workgroups) nwg: vec3u,
                                @builtin(local_invocation_id) lid: vec3u) {
  let i = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (i >= sp.count) {
    return;
  }
  let r = u32(rows[sp.first + i]);
  if (r < sp.row0 || r >= sp.row0 + sp.chunk_rows) {
    return;
  }
  var dot = 0.0;
  for (var c = 0u; c < sp.cols; c++) {
    dot += src[sp.src_off + (r - sp.row0) * sp.cols + c] * y[sp.other_off + i * sp.cols + c];
  }
  d_scales[sp.first + i] = dot;
}

struct EmbParams {
  count: u32, // distinct ids in this dispatch
  cols: u32,
  row0: u32, // first table row held by this binding of the gradient
  first: u32, // ids[first] is this dispatch's first distinct id
  dy0: u32, // dy rows [dy0, dy0 + dy_rows) are bound
  dy_rows: u32,
  dy_off: u32, // dy and grad are bound from aligned offsets; these skip to row 0
  grad_off: u32,
}

@group(0) @binding(0) var<uniform> ep: EmbParams;
@group(0) @binding(1) var<storage, read> ids: array<i32>; // distinct ids, ascending
@group(0) @binding(2) var<storage, read> starts: array<u32>; // [distinct + 1] into positions
@group(0) @binding(3) var<storage, read> positions: array<i32>; // token positions, by id
@group(0) @binding(4) var<storage, read> dy_rows: array<f32>; // [dy_rows, cols]
@group(0) @binding(5) var<storage, read_write> grad: array<f32>; // table grad rows row0..

// tableGrad[id, c] += sum of dy[pos, c] over the positions holding id. Ids repeat, so the
// host groups positions by id and one thread per (distinct id, c) adds them in position
// order: one writer per entry, no atomics, the same order as the CPU reference.
@compute @workgroup_size(64)
fn embedding_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                      @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= ep.count * ep.cols) {
    return;
  }
  let u = ep.first + t / ep.cols;
  let c = t % ep.cols;
  let o = ep.grad_off + (u32(ids[u]) - ep.row0) * ep.cols + c;
  var acc = grad[o];
  for (var s = starts[u]; s < starts[u + 1u]; s++) {
    let pos = u32(positions[s]);
    if (pos >= ep.dy0 && pos < ep.dy0 + ep.dy_rows) {
      acc += dy_rows[ep.dy_off + (pos - ep.dy0) * ep.cols + c];
    }
  }
  grad[o] = acc;
}
