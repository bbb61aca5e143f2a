// HF rotate_half RoPE. The cos/sin table [rows, half] comes from the host, computed in f32
// exactly as HF does: WGSL only bounds cos/sin error on [-pi, pi], and angles reach
// position * 1 = thousands of radians.

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
  let c = cos_table[r * half + i];
  let s = sin_table[r * half + i];
  let o = r * p.heads * p.head_dim + h * p.head_dim;
  let a = x[p.x_off + o + i];
  let b = x[p.x_off + o + i + half];
  out[p.out_off + o + i] = a * c - b * s;
  out[p.out_off + o + i + half] = b * c + a * s;
}
