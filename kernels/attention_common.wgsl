// Shared by the forward attention kernels (attention.wgsl, attention_tiled.wgsl,
// attention_split.wgsl; the host prepends it): their uniforms and bindings.

struct Params {
  seqs: u32, // sequences in this dispatch
  q_len: u32,
  kv_len: u32,
  heads: u32,
  kv_heads: u32,
  head_dim: u32, // attention_tiled has it as HEAD_DIM too, a pipeline constant
  window: u32, // 0 = no sliding window
  scale: f32, // 1 / sqrt(head_dim)
  q_off: u32, // each tensor is bound from an aligned offset; these skip to its row 0
  k_off: u32,
  v_off: u32,
  out_off: u32,
  kv_stride: u32, // rows per sequence in k and v (kv_len, or a KV cache's capacity)
  splits: u32, // attention_split only: key splits a query, of split_keys keys each
  split_keys: u32,
  stats_off: u32, // attention_tiled with SAVE_STATS only: row 0 of row_stats
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>; // [seqs * q_len, heads * head_dim]
@group(0) @binding(2) var<storage, read> k: array<f32>; // [seqs * kv_stride, kv_heads * head_dim]
@group(0) @binding(3) var<storage, read> v: array<f32>; // [seqs * kv_stride, kv_heads * head_dim]
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // like q
