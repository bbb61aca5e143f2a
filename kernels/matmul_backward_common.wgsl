// Shared by the backward matmul kernels (prepended after weights.wgsl): the gradients of
// out = x @ w^T (+ bias) for one row chunk of w (rows col0 .. col0 + cols).

struct Params {
  rows: u32, // N rows of dy / x / dx in this dispatch
  k: u32, // K, row width of x, dx and w
  cols: u32, // weight rows handled: rows of this w chunk, or of this dW range
  dy_stride: u32, // M, the full row width of dy
  col0: u32, // first weight row (= dy column) handled
  dy_off: u32, // the f32 tensors are bound from aligned offsets; these skip to row 0
  x_off: u32,
  out_off: u32,
  accumulate: u32, // input_grad: 0 = write dx, 1 = add to it (later weight chunks)
  // GROUPED input_grad only (kernels/matmul_grouped.wgsl): as the forward's Params.
  first_group: u32,
  end_group: u32,
  m: u32,
  chunk_row0: u32,
  chunk_rows: u32,
  r0: u32,
  tile_rows: u32,
}

// input_grad of matmul_backward_blocked.wgsl (groupedMatmulBackward): w holds a run of
// experts' [M, k] matrices back to back, dy and dx are the grouped rows, and each
// workgroup finds its rows, matrix and reduction range from the group starts.
override GROUPED: bool = false;

override W_DTYPE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>; // [rows, dy_stride]
@group(0) @binding(2) var<storage, read> w: array<u32>; // [cols, k] in W_DTYPE
@group(0) @binding(3) var<storage, read_write> dx: array<f32>; // [rows, k]
@group(0) @binding(2) var<storage, read> x: array<f32>; // [rows, k]
@group(0) @binding(3) var<storage, read_write> dw: array<f32>; // [cols, k], weight rows col0..
@group(0) @binding(4) var<storage, read> starts: array<u32>; // GROUPED: [groups + 1] first rows
