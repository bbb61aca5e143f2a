// Flash-decoding: attention with each query's keys split across workgroups, for decoding
// over long KV caches, where one query row a head leaves the other kernels a handful of
// workgroups (attention_tiled: one per sequence and kv head) each walking every key.
// split_partial: one workgroup per (query row, head, split) scores its split's keys in
// workgroup memory and writes the split's max m, normaliser l and unnormalised output o
// to `partials`; split_merge rescales the splits to their common max and sums them (with
// one split the partial pass writes the output itself). Any q_len works (each query on
// its own), but only decode gains.
// Params and the q, k, v, out bindings: attention_common.wgsl; first_key:
// attention_window.wgsl.

@group(0) @binding(5) var<storage, read_write> partials: array<f32>; // [rows, splits, head_dim + 2]

const THREADS: u32 = 64u;
const SPLIT_KEYS: u32 = 256u; // keys per split, at most (the host's ATTN_SPLIT_KEYS)
var<workgroup> scores: array<f32, SPLIT_KEYS>;
var<workgroup> reduce: array<f32, THREADS>;

// Query row `row` = (sequence, query, head): where its q and output rows start, its kv
// head and its visible keys [lo, pos].
struct Query {
  b: u32,
  kh: u32,
  lo: u32,
  pos: u32,
  q_row: u32,
}

fn query(row: u32) -> Query {
  let h = row % p.heads;
  let i = (row / p.heads) % p.q_len;
  let b = row / (p.heads * p.q_len);
  let pos = p.kv_len - p.q_len + i;
  let lo = first_key(pos);
  let q_row = (b * p.q_len + i) * p.heads * p.head_dim + h * p.head_dim;
  return Query(b, h / (p.heads / p.kv_heads), lo, pos, q_row);
}

// The workgroup's `reduce` values combined by max (is_max) or sum; every thread gets it.
fn workgroup_reduce(value: f32, t: u32, is_max: bool) -> f32 {
  workgroupBarrier(); // every thread has read the previous result
  reduce[t] = value;
  for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
    workgroupBarrier();
    if (t < stride) {
      if (is_max) {
        reduce[t] = max(reduce[t], reduce[t + stride]);
      } else {
        reduce[t] += reduce[t + stride];
      }
    }
  }
  return workgroupUniformLoad(&reduce[0]);
}

@compute @workgroup_size(64)
fn split_partial(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_index) t: u32) {
  let flat = wg.y * nwg.x + wg.x;
  let rows = p.seqs * p.q_len * p.heads;
  if (flat >= rows * p.splits) {
    return;
  }
  let row = flat / p.splits;
  let split = flat % p.splits;
  let qr = query(row);
  let hd = p.head_dim;
  let kv_width = p.kv_heads * hd;
  // This split's keys [j0, j1): empty past the visible ones (m stays at the floor, l at 0).
  let j0 = qr.lo + split * p.split_keys;
  let j1 = min(qr.pos + 1u, j0 + p.split_keys);
  var m = -3.4e38;
  for (var jj = t; jj < p.split_keys; jj += THREADS) {
    var s = -3.4e38;
    if (j0 + jj < j1) {
      let k_off = p.k_off + (qr.b * p.kv_stride + j0 + jj) * kv_width + qr.kh * hd;
      var dot = 0.0;
      for (var e = 0u; e < hd; e++) {
        dot += q[p.q_off + qr.q_row + e] * k[k_off + e];
      }
      s = dot * p.scale;
    }
    scores[jj] = s;
    m = max(m, s);
  }
  m = workgroup_reduce(m, t, true);
  var l = 0.0;
  for (var jj = t; jj < p.split_keys; jj += THREADS) {
    var weight = 0.0;
    if (j0 + jj < j1) {
      weight = exp(scores[jj] - m);
    }
    scores[jj] = weight;
    l += weight;
  }
  l = workgroup_reduce(l, t, false); // its barriers also publish every thread's weights
  let base = (row * p.splits + split) * (hd + 2u);
  let count = select(0u, j1 - j0, j1 > j0);
  for (var e = t; e < hd; e += THREADS) {
    var acc = 0.0;
    for (var jj = 0u; jj < count; jj++) {
      acc += scores[jj] * v[p.v_off + (qr.b * p.kv_stride + j0 + jj) * kv_width + qr.kh * hd + e];
    }
    if (p.splits == 1u) {
      out[p.out_off + qr.q_row + e] = acc / l; // all keys in one split: no merge pass
    } else {
      partials[base + e] = acc;
    }
  }
  if (t == 0u && p.splits > 1u) {
    partials[base + hd] = m;
    partials[base + hd + 1u] = l;
  }
}

// One thread per (query row, dimension): the splits rescaled to their largest max.
@compute @workgroup_size(64)
fn split_merge(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_index) t: u32) {
  let g = (wg.y * nwg.x + wg.x) * THREADS + t;
  let hd = p.head_dim;
  let rows = p.seqs * p.q_len * p.heads;
  if (g >= rows * hd) {
    return;
  }
  let row = g / hd;
  let e = g % hd;
  let first = row * p.splits * (hd + 2u);
  var m = -3.4e38;
  for (var s = 0u; s < p.splits; s++) {
    m = max(m, partials[first + s * (hd + 2u) + hd]);
  }
  var l = 0.0;
  var o = 0.0;
  for (var s = 0u; s < p.splits; s++) {
    let base = first + s * (hd + 2u);
    let scale = exp(partials[base + hd] - m);
    l += partials[base + hd + 1u] * scale;
    o += partials[base + e] * scale;
  }
  out[p.out_off + query(row).q_row + e] = o / l;
}
