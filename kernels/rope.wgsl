// HF rotate_half RoPE (rope), and the split of a fused q|k|v projection with it
// (split_qkv). The cos/sin table [rows, half] comes from the host, computed in f32 exactly
// as HF does: WGSL only bounds cos/sin error on [-pi, pi], and angles reach position * 1 =
// thousands of radians.

struct Params {
  rows: u32,
  heads: u32,
  head_dim: u32,
  x_off: u32, // x and out are bound from an aligned offset; these skip to row 0
  out_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, heads * head_dim]
@group(0) @binding(2) var<storage, read> cos_table: array<f32>; // [rows, head_dim / 2]
@group(0) @binding(3) var<storage, read> sin_table: array<f32>; // [rows, head_dim / 2]
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // [rows, heads * head_dim]

// The pair (a, b) = (x_i, x_{i + half}) rotated by the angle whose cos and sin are c, s.
fn rotated(a: f32, b: f32, c: f32, s: f32) -> vec2f {
  return vec2f(a * c - b * s, b * c + a * s);
}

// One thread per (row, head, i < half): rotates the pair (i, i + half).
@compute @workgroup_size(64)
fn rope(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  let half = p.head_dim / 2u;
  if (t >= p.rows * p.heads * half) {
    return;
  }
  let i = t % half;
  let h = (t / half) % p.heads;
  let r = t / (half * p.heads);
  let o = r * p.heads * p.head_dim + h * p.head_dim;
  let ab = rotated(x[p.x_off + o + i], x[p.x_off + o + i + half], cos_table[r * half + i],
                   sin_table[r * half + i]);
  out[p.out_off + o + i] = ab.x;
  out[p.out_off + o + i + half] = ab.y;
}

// split_qkv: a fused projection [rows, (heads + 2 kv_heads) * head_dim] into q, k and v,
// q and k rotated when `rotate` is 1 (the tables are placeholders otherwise). Row r of k
// and v goes to row (g / kv_seq_len) * kv_capacity + kv_past + g % kv_seq_len, g = row0 + r:
// row r itself for new tensors (kv_seq_len = kv_capacity = rows, row0 = kv_past = 0), a
// KV cache's rows for the decode step's append (splitQkvIntoCache).
struct SplitParams {
  rows: u32,
  heads: u32,
  kv_heads: u32,
  head_dim: u32,
  rotate: u32,
  qkv_off: u32, // offsets of row 0 in each binding, as in Params
  q_off: u32,
  k_off: u32,
  v_off: u32,
  row0: u32,
  kv_seq_len: u32,
  kv_capacity: u32,
  kv_past: u32,
}

@group(0) @binding(0) var<uniform> sp: SplitParams;
@group(0) @binding(1) var<storage, read> qkv: array<f32>; // [rows, (heads + 2 kv_heads) * head_dim]
@group(0) @binding(4) var<storage, read_write> q: array<f32>; // [rows, heads * head_dim]
@group(0) @binding(5) var<storage, read_write> k: array<f32>; // [rows, kv_heads * head_dim]
@group(0) @binding(6) var<storage, read_write> v: array<f32>; // like k

// One thread per (row, head of q, k or v, i < half), as rope.
@compute @workgroup_size(64)
fn split_qkv(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
             @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  let hd = sp.head_dim;
  let half = hd / 2u;
  let all_heads = sp.heads + 2u * sp.kv_heads;
  if (t >= sp.rows * all_heads * half) {
    return;
  }
  let i = t % half;
  let h = (t / half) % all_heads;
  let r = t / (half * all_heads);
  let src = sp.qkv_off + (r * all_heads + h) * hd;
  var ab = vec2f(qkv[src + i], qkv[src + i + half]);
  if (sp.rotate == 1u && h < sp.heads + sp.kv_heads) {
    ab = rotated(ab.x, ab.y, cos_table[r * half + i], sin_table[r * half + i]);
  }
  if (h < sp.heads) {
    let o = sp.q_off + (r * sp.heads + h) * hd;
    q[o + i] = ab.x;
    q[o + i + half] = ab.y;
    return;
  }
  let g = sp.row0 + r;
  let kv_row = (g / sp.kv_seq_len) * sp.kv_capacity + sp.kv_past + g % sp.kv_seq_len;
  if (h < sp.heads + sp.kv_heads) {
    let o = sp.k_off + (kv_row * sp.kv_heads + h - sp.heads) * hd;
    k[o + i] = ab.x;
    k[o + i + half] = ab.y;
  } else {
    let o = sp.v_off + (kv_row * sp.kv_heads + h - sp.heads - sp.kv_heads) * hd;
    v[o + i] = ab.x;
    v[o + i + half] = ab.y;
  }
}
