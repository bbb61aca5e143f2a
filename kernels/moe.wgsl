// MoE routing and token dispatch: softmax + top-k per token, gather the rows routed to one
// expert, and scatter-add the expert output back weighted by the routing weight.

// RouteParams, the logits and their softmax: route.wgsl.
// [rows, 2k]: k expert ids, then k weights as f32 bits.
@group(0) @binding(2) var<storage, read_write> routing: array<u32>;

// True when (pa, a) comes before (pb, b) in the order: probability descending, index ascending.
fn before(pa: f32, a: u32, pb: f32, b: u32) -> bool {
  return pa > pb || (pa == pb && a < b);
}

// One thread per token. Selection by k passes: pass j picks the best expert that comes
// after pass j-1's pick, so nothing but the previous pick needs remembering.
@compute @workgroup_size(64)
fn route_topk(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
              @builtin(local_invocation_id) lid: vec3u) {
  let r = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (r >= rp.rows) {
    return;
  }
  let base = rp.logits_off + r * rp.experts;
  let stats = softmax_stats(base);
  let out_base = rp.out_off + r * 2u * rp.k;
  var prev_p = 2.0; // above any probability: everything comes after it
  var prev_e = 0u;
  var chosen = 0.0;
  for (var j = 0u; j < rp.k; j++) {
    var best_p = -1.0;
    var best_e = 0u;
    for (var e = 0u; e < rp.experts; e++) {
      let pe = softmax_prob(base, e, stats);
      if (before(prev_p, prev_e, pe, e) && before(pe, e, best_p, best_e)) {
        best_p = pe;
        best_e = e;
      }
    }
    routing[out_base + j] = best_e;
    routing[out_base + rp.k + j] = bitcast<u32>(best_p);
    chosen += best_p;
    prev_p = best_p;
    prev_e = best_e;
  }
  if (rp.normalize == 1u) {
    for (var j = 0u; j < rp.k; j++) {
      let wj = bitcast<f32>(routing[out_base + rp.k + j]);
      routing[out_base + rp.k + j] = bitcast<u32>(wj / (chosen + rp.eps));
    }
  }
}

// split_compressed: compressed experts' routing on the device (host twin: splitRouting in
// lib/model/compressed_experts.ts). Of a token's raw sorted top-k (route_topk with
// normalize 0), the first km are its main experts, written as a routing plan_experts
// reads (where the config renormalises, weights divided by eps + the sum over all top-k,
// or with over_top_k 0 over the main experts); the other k - km are its aux experts,
// written as the token's row of the dense alphas [rows, experts]: p_i / (sum of the aux
// p) at each aux expert, zero elsewhere.
struct SplitParams {
  rows: u32,
  experts: u32,
  k: u32,
  km: u32,
  normalize: u32,
  eps: f32,
  over_top_k: u32,
}

@group(0) @binding(0) var<uniform> xp: SplitParams;
@group(0) @binding(1) var<storage, read> raw_routing: array<u32>; // [rows, 2k]
@group(0) @binding(2) var<storage, read_write> main_routing: array<u32>; // [rows, 2km]
@group(0) @binding(3) var<storage, read_write> aux_alpha: array<f32>; // [rows, experts]

@compute @workgroup_size(64)
fn split_compressed(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                    @builtin(local_invocation_id) lid: vec3u) {
  let r = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (r >= xp.rows) {
    return;
  }
  let base = r * 2u * xp.k;
  var main_sum = 0.0;
  var aux_sum = 0.0;
  var top_sum = 0.0;
  for (var j = 0u; j < xp.k; j++) {
    let p = bitcast<f32>(raw_routing[base + xp.k + j]);
    top_sum += p;
    if (j < xp.km) {
      main_sum += p;
    } else {
      aux_sum += p;
    }
  }
  let z = select(1.0, select(main_sum, top_sum, xp.over_top_k == 1u) + xp.eps, xp.normalize == 1u);
  let main_base = r * 2u * xp.km;
  for (var j = 0u; j < xp.km; j++) {
    main_routing[main_base + j] = raw_routing[base + j];
    main_routing[main_base + xp.km + j] = bitcast<u32>(bitcast<f32>(raw_routing[base + xp.k + j]) / z);
  }
  let alpha_base = r * xp.experts;
  for (var e = 0u; e < xp.experts; e++) {
    aux_alpha[alpha_base + e] = 0.0;
  }
  // aux_sum is a sum of softmax outputs, > 0 unless every aux probability underflows.
  let even = 1.0 / f32(xp.k - xp.km);
  for (var j = xp.km; j < xp.k; j++) {
    let p = bitcast<f32>(raw_routing[base + xp.k + j]);
    aux_alpha[alpha_base + raw_routing[base + j]] = select(even, p / aux_sum, aux_sum > 0.0);
  }
}

struct RowParams {
  count: u32, // selected rows in this dispatch
  cols: u32,
  row0: u32, // first row of the big tensor held by this binding
  chunk_rows: u32,
  first: u32, // rows[first] (and scales[first]) belong to this dispatch's first row
  in_off: u32, // the f32 tensors are bound from aligned offsets; these skip to row 0
  out_off: u32,
}

@group(0) @binding(0) var<uniform> gp: RowParams;
@group(0) @binding(1) var<storage, read> rows: array<i32>; // all selected rows
@group(0) @binding(2) var<storage, read> src: array<f32>; // [chunk_rows, cols]
@group(0) @binding(3) var<storage, read_write> gathered: array<f32>; // [count, cols]

// gathered[i] = src[rows[i]] for the rows inside this chunk of src.
@compute @workgroup_size(64)
fn gather_rows(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= gp.count * gp.cols) {
    return;
  }
  let i = t / gp.cols;
  let c = t % gp.cols;
  let r = u32(rows[gp.first + i]);
  if (r >= gp.row0 && r < gp.row0 + gp.chunk_rows) {
    gathered[gp.out_off + t] = src[gp.in_off + (r - gp.row0) * gp.cols + c];
  }
}

@group(0) @binding(0) var<uniform> sp: RowParams;
@group(0) @binding(1) var<storage, read> dst_rows: array<i32>; // all selected rows
@group(0) @binding(2) var<storage, read> scales: array<f32>; // all scales
@group(0) @binding(3) var<storage, read> y: array<f32>; // [count, cols]
@group(0) @binding(4) var<storage, read_write> dst: array<f32>; // [chunk_rows, cols]

// dst[rows[i]] += scales[i] * y[i]. Rows are distinct within a call, so each output entry
// has exactly one writer and no atomics are needed.
@compute @workgroup_size(64)
fn scatter_add_rows(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                    @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= sp.count * sp.cols) {
    return;
  }
  let i = t / sp.cols;
  let c = t % sp.cols;
  let r = u32(dst_rows[sp.first + i]);
  if (r >= sp.row0 && r < sp.row0 + sp.chunk_rows) {
    let o = sp.out_off + (r - sp.row0) * sp.cols + c;
    dst[o] += scales[sp.first + i] * y[sp.in_off + t];
  }
}

// combine_rows: out[r] += sum over j < k of scales[r k + j] * y[sources[r k + j]], in j
// order, one thread per output element, so a token's k expert outputs never race. When y
// is bound in row ranges, each dispatch adds the sources that lie in its range.
struct CombineParams {
  rows: u32, // output rows in this dispatch
  cols: u32,
  k: u32,
  row0: u32, // first output row of this dispatch (indexes sources and scales)
  y0: u32, // first row of y in its binding, and how many
  y_rows: u32,
  y_off: u32, // y and out are bound from an aligned offset; these skip to their row 0
  out_off: u32,
}

@group(0) @binding(0) var<uniform> cp: CombineParams;
@group(0) @binding(1) var<storage, read> sources: array<i32>; // [all rows, k]
@group(0) @binding(2) var<storage, read> source_scales: array<f32>; // [all rows, k]
@group(0) @binding(3) var<storage, read> expert_out: array<f32>; // [y_rows, cols]
@group(0) @binding(4) var<storage, read_write> combined: array<f32>; // [rows, cols]

@compute @workgroup_size(64)
fn combine_rows(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= cp.rows * cp.cols) {
    return;
  }
  let r = cp.row0 + t / cp.cols;
  let c = t % cp.cols;
  var v = combined[cp.out_off + t];
  for (var j = 0u; j < cp.k; j++) {
    let s = u32(sources[r * cp.k + j]);
    if (s >= cp.y0 && s < cp.y0 + cp.y_rows) {
      v += source_scales[r * cp.k + j] * expert_out[cp.y_off + (s - cp.y0) * cp.cols + c];
    }
  }
  combined[cp.out_off + t] = v;
}

// plan_experts: group the routed tokens by expert on the device, so the expert path never
// reads the routing back (the host twin is expertPlan in lib/backend/backend.ts). One
// workgroup; thread e (and e + 256, ...) owns expert e: it counts the expert's tokens,
// and once thread 0 has turned the counts into group starts, lists them in token order.
// For token t, sources[t k + rank] is the grouped row of its expert of rank `rank` in
// ascending expert id, the order combine_rows adds the outputs in.
//
// Batches too large for one workgroup (a prefill) take three kernels over chunks of
// PLAN_CHUNK tokens instead, for the same plan: plan_count counts each chunk's entries
// per expert; plan_scan (one workgroup) turns them into each (chunk, expert)'s first
// grouped row, an expert's chunks in turn, and writes the group starts; plan_place lists
// each chunk's tokens from there. No thread then loops over more than a chunk (or the
// chunk count), however large the batch.
struct PlanParams {
  tokens: u32,
  experts: u32,
  k: u32,
  routing_off: u32, // route_topk's output may be bound from an aligned offset
}

const PLAN_THREADS: u32 = 256u;
const PLAN_MAX_EXPERTS: u32 = 1024u; // the host checks this
const PLAN_CHUNK: u32 = 256u;
var<workgroup> group_first: array<u32, 1025>; // PLAN_MAX_EXPERTS + 1

@group(0) @binding(0) var<uniform> pp: PlanParams;
@group(0) @binding(1) var<storage, read> routed: array<u32>; // [tokens, 2k], as route_topk writes
@group(0) @binding(2) var<storage, read_write> group_start: array<u32>; // [experts + 1]
@group(0) @binding(3) var<storage, read_write> order: array<u32>; // [tokens k]: token of each grouped row
@group(0) @binding(4) var<storage, read_write> plan_sources: array<u32>; // [tokens, k]
@group(0) @binding(5) var<storage, read_write> plan_scales: array<f32>; // [tokens, k]
// plan_count's output and plan_scan's input and output: [chunks, experts], the counts,
// then each (chunk, expert)'s first grouped row; plan_place reads it.
@group(0) @binding(2) var<storage, read_write> chunk_counts: array<u32>;
@group(0) @binding(1) var<storage, read_write> chunk_first: array<u32>;
@group(0) @binding(2) var<storage, read> place_first: array<u32>;

// Expert e's entries among tokens [t0, t1).
fn count_entries(e: u32, t0: u32, t1: u32) -> u32 {
  var count = 0u;
  for (var t = t0; t < t1; t++) {
    for (var j = 0u; j < pp.k; j++) {
      count += select(0u, 1u, routed[pp.routing_off + t * 2u * pp.k + j] == e);
    }
  }
  return count;
}

// Lists expert e's entries among tokens [t0, t1) as grouped rows first, first + 1, ...
fn place_entries(e: u32, first: u32, t0: u32, t1: u32) {
  var at = first;
  for (var t = t0; t < t1; t++) {
    let base = pp.routing_off + t * 2u * pp.k;
    for (var j = 0u; j < pp.k; j++) {
      if (routed[base + j] == e) {
        var rank = 0u;
        for (var i = 0u; i < pp.k; i++) {
          rank += select(0u, 1u, routed[base + i] < e);
        }
        order[at] = t;
        plan_sources[t * pp.k + rank] = at;
        plan_scales[t * pp.k + rank] = bitcast<f32>(routed[base + pp.k + j]);
        at++;
      }
    }
  }
}

// group_first[e + 1] holds expert e's entries: thread 0 turns them into group starts,
// which go to group_start. Called by the whole workgroup.
fn start_groups(lid: u32) {
  workgroupBarrier();
  if (lid == 0u) {
    group_first[0] = 0u;
    for (var e = 0u; e < pp.experts; e++) {
      group_first[e + 1u] += group_first[e];
    }
  }
  workgroupBarrier();
  for (var e = lid; e <= pp.experts; e += PLAN_THREADS) {
    group_start[e] = group_first[e];
  }
}

@compute @workgroup_size(256)
fn plan_experts(@builtin(local_invocation_index) lid: u32) {
  for (var e = lid; e < pp.experts; e += PLAN_THREADS) {
    group_first[e + 1u] = count_entries(e, 0u, pp.tokens);
  }
  start_groups(lid);
  for (var e = lid; e < pp.experts; e += PLAN_THREADS) {
    place_entries(e, group_first[e], 0u, pp.tokens);
  }
}

@compute @workgroup_size(256)
fn plan_count(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let t0 = wg.x * PLAN_CHUNK;
  let t1 = min(t0 + PLAN_CHUNK, pp.tokens);
  for (var e = lid; e < pp.experts; e += PLAN_THREADS) {
    chunk_counts[wg.x * pp.experts + e] = count_entries(e, t0, t1);
  }
}

@compute @workgroup_size(256)
fn plan_scan(@builtin(local_invocation_index) lid: u32) {
  let chunks = (pp.tokens + PLAN_CHUNK - 1u) / PLAN_CHUNK;
  // Each expert's chunks in turn: counts to first rows within the expert's group.
  for (var e = lid; e < pp.experts; e += PLAN_THREADS) {
    var at = 0u;
    for (var c = 0u; c < chunks; c++) {
      let count = chunk_first[c * pp.experts + e];
      chunk_first[c * pp.experts + e] = at;
      at += count;
    }
    group_first[e + 1u] = at;
  }
  start_groups(lid);
  for (var e = lid; e < pp.experts; e += PLAN_THREADS) {
    for (var c = 0u; c < chunks; c++) {
      chunk_first[c * pp.experts + e] += group_first[e];
    }
  }
}

@compute @workgroup_size(256)
fn plan_place(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let t0 = wg.x * PLAN_CHUNK;
  let t1 = min(t0 + PLAN_CHUNK, pp.tokens);
  for (var e = lid; e < pp.experts; e += PLAN_THREADS) {
    place_entries(e, place_first[wg.x * pp.experts + e], t0, t1);
  }
}
