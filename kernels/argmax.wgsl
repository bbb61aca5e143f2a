// Greedy decoding's argmax: ids[first + r] = the index of the first maximum of row r of x
// [rows, cols], as torch.argmax and the host's argmaxRow pick it. NaN never wins (it counts
// as -inf, so a row with no value above -inf gives its first index: 0). The ids stay on the
// device, where the next step's embedding reads them.

struct Params {
  rows: u32,
  cols: u32,
  first: u32, // ids[first] belongs to this dispatch's row 0
  x_off: u32, // x is bound from an aligned offset; this skips to row 0
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>; // [rows, cols]
@group(0) @binding(2) var<storage, read_write> ids: array<u32>; // all rows

const THREADS: u32 = 256u;
const NEG_INF: u32 = 0xff800000u;
var<workgroup> best_value: array<f32, 256>;
var<workgroup> best_index: array<u32, 256>;

// NaN by its bits: comparisons with NaN may be folded away by a shader compiler.
fn not_nan(v: f32) -> f32 {
  if ((bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u) {
    return bitcast<f32>(NEG_INF);
  }
  return v;
}

// (value, index) pairs: the larger value wins, a tie goes to the smaller index.
fn beats(v: f32, i: u32, w: f32, j: u32) -> bool {
  return v > w || (v == w && i < j);
}

// One workgroup per row: each thread keeps the first maximum of its strided columns (it
// walks them in order, so only a larger value replaces), then a tree reduction.
@compute @workgroup_size(256)
fn argmax_rows(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_id) lid: vec3u) {
  let row = wg.y * nwg.x + wg.x;
  // Uniform control flow: every thread of a workgroup shares `row`.
  if (row >= p.rows) {
    return;
  }
  let base = p.x_off + row * p.cols;
  var v = bitcast<f32>(NEG_INF);
  var i = 0u;
  for (var j = lid.x; j < p.cols; j += THREADS) {
    let value = not_nan(x[base + j]);
    if (value > v || (j == lid.x && value == v)) {
      v = value;
      i = j;
    }
  }
  if (lid.x >= p.cols) {
    i = p.cols; // no columns: loses every tie
  }
  best_value[lid.x] = v;
  best_index[lid.x] = i;
  workgroupBarrier();
  for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
    if (lid.x < stride) {
      let w = best_value[lid.x + stride];
      let j = best_index[lid.x + stride];
      if (beats(w, j, best_value[lid.x], best_index[lid.x])) {
        best_value[lid.x] = w;
        best_index[lid.x] = j;
      }
    }
    workgroupBarrier();
  }
  if (lid.x == 0u) {
    ids[p.first + row] = best_index[0];
  }
}
