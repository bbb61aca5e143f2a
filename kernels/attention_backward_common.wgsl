// Shared by the attention backward kernels (attention_backward.wgsl,
// attention_backward_tiled.wgsl; the host prepends it): their uniforms and bindings. Each
// file has two entry points, a query pass then a key pass; bindings 5 to 7 differ between
// the two passes.

struct Params {
  seqs: u32, // sequences in this dispatch
  q_len: u32,
  kv_len: u32,
  heads: u32,
  kv_heads: u32,
  head_dim: u32, // attention_backward_tiled has it as HEAD_DIM too, a pipeline constant
  window: u32, // 0 = no sliding window
  scale: f32, // 1 / sqrt(head_dim)
  q_off: u32, // each tensor is bound from an aligned offset; these skip to its row 0
  k_off: u32,
  v_off: u32,
  do_off: u32,
  dq_off: u32,
  dk_off: u32,
  dv_off: u32,
  stats_off: u32, // stats' row 0 (the forward's statistics may be bound from an offset)
  o_off: u32, // attention_backward_tiled with SAVED_STATS only: row 0 of out_saved
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>; // [seqs * q_len, heads * head_dim]
@group(0) @binding(2) var<storage, read> k: array<f32>; // [seqs * kv_len, kv_heads * head_dim]
@group(0) @binding(3) var<storage, read> v: array<f32>; // [seqs * kv_len, kv_heads * head_dim]
@group(0) @binding(4) var<storage, read> d_out: array<f32>; // like q

// The query pass: per-row statistics for the key pass (what each kernel keeps: its
// header), and dq.
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
@group(0) @binding(6) var<storage, read_write> dq: array<f32>; // like q
// With the forward's statistics (attention_backward_tiled, SAVED_STATS): its output, like q.
@group(0) @binding(7) var<storage, read> out_saved: array<f32>;

// The key pass: the statistics, dk and dv.
@group(0) @binding(5) var<storage, read> stats_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> dk: array<f32>; // like k
@group(0) @binding(7) var<storage, read_write> dv: array<f32>; // like v
