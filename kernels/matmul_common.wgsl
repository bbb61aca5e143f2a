// Shared by the forward matmul kernels (prepended after weights.wgsl):
// out[n, col0 + c] = sum_k x[n, k] * w[c, k] (+ bias[col0 + c]) for one row chunk of w.

struct Params {
  rows: u32, // N rows of x in this dispatch
  k: u32, // inner dimension
  cols: u32, // rows of this weight chunk = output columns written
  out_stride: u32, // M, the full output row width
  col0: u32, // first output column (first weight row) of this chunk
  x_off: u32, // x and out are bound from an aligned offset; these skip to row 0
  out_off: u32,
  // GROUPED only (grouped_tile): the experts [first_group, end_group) whose matrices this
  // weight chunk holds (its rows chunk_row0 .. + chunk_rows of the whole stack), m rows
  // each; x rows r0 .. r0 + rows of the stacked order are bound; tiles of tile_rows rows.
  first_group: u32,
  end_group: u32,
  m: u32,
  chunk_row0: u32,
  chunk_rows: u32,
  r0: u32,
  tile_rows: u32,
}

override W_DTYPE: u32 = 0u;
override B_DTYPE: u32 = 0u;
override HAS_BIAS: bool = false;
// blocked and gemv: x_off and K are multiples of 4, so x is read as aligned vec4s of x4.
override VEC_X: bool = false;
// blocked and gemv: K allows whole vec4 runs of w (see each kernel), read from w4.
override VEC_W: bool = false;
// blocked and gemv (groupedMatmul): w holds a run of experts' [M, k] matrices back to back,
// and each workgroup finds its tile (grouped_tile: which rows, matrix and columns) from the
// group starts, which an earlier kernel may have written (plan_experts).
override GROUPED: bool = false;
// GROUPED over a gateUp stack (lib/backend/backend.ts ExpertStacks): w's rows are gate and
// up rows interleaved in runs of 4, so each 8-row block holds 4 gate and the matching 4 up
// columns; the kernel writes silu(gate) * up, out_stride = the expert width. Tiles start
// on whole blocks (the host keeps weight chunks to whole blocks).
override SWIGLU: bool = false;
// GROUPED: x is bound whole and row r of the grouped order is row x_rows[r0 + r] of it
// (the plan's order), so the rows need no gather pass of their own.
override GATHER: bool = false;

fn silu_mul(g: f32, u: f32) -> f32 {
  return g / (1.0 + exp(-g)) * u;
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, k]
@group(0) @binding(2) var<storage, read> w: array<u32>; // [cols, k] in W_DTYPE
@group(0) @binding(3) var<storage, read> bias: array<u32>; // [M] in B_DTYPE
@group(0) @binding(4) var<storage, read_write> out: array<f32>; // [rows, out_stride]
// The same x and w bindings seen as vec4s (a placeholder when VEC_X / VEC_W is off).
@group(0) @binding(5) var<storage, read> x4: array<vec4f>;
@group(0) @binding(6) var<storage, read> w4: array<vec4u>;
@group(0) @binding(7) var<storage, read> starts: array<u32>; // GROUPED: [groups + 1] first rows
@group(0) @binding(8) var<storage, read> x_rows: array<u32>; // GATHER: x row of each grouped row

// Where row r of this dispatch's rows starts in x (elements).
fn x_row_start(r: u32) -> u32 {
  if (GATHER) {
    return p.x_off + x_rows[p.r0 + r] * p.k;
  }
  return p.x_off + r * p.k;
}
