// Elementwise and row-wise backward ops and small reductions over flat f32 ranges, 64
// threads per workgroup on a 2-D grid of workgroups (as elementwise.wgsl).

struct Params {
  count: u32, // entries (or rows, for the row-wise ops) in this dispatch
  cols: u32, // row width, for the row-wise ops
  scalar: f32, // clamp limit
  a_off: u32, // the tensors are bound from aligned offsets; these skip to entry 0
  b_off: u32,
  c_off: u32,
  out_off: u32,
  out2_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> out2: array<f32>;

// flat_index and sigmoid: elementwise_common.wgsl.

// The gradients of silu(g) * u from dy: dGate = dy * u * sig * (1 + g * (1 - sig)) and
// dUp = dy * silu(g).
fn swiglu_grads(g: f32, u: f32, d: f32) -> vec2f {
  let s = sigmoid(g);
  return vec2f(d * u * s * (1.0 + g * (1.0 - s)), d * g * s);
}

// gate = a, up = b, dy = c: dGate -> out, dUp -> out2. One thread per entry.
@compute @workgroup_size(64)
fn swiglu_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    let grads = swiglu_grads(a[p.a_off + i], b[p.b_off + i], c[p.c_off + i]);
    out[p.out_off + i] = grads.x;
    out2[p.out2_off + i] = grads.y;
  }
}

// Backward of elementwise.wgsl swiglu_gate_up: gateUp = a, dy = c -> out, dGate and dUp
// interleaved like gateUp. One thread per dy entry; dispatches start on whole runs.
@compute @workgroup_size(64)
fn swiglu_gate_up_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                           @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    let gi = 2u * i - i % 4u;
    let grads = swiglu_grads(a[p.a_off + gi], a[p.a_off + gi + 4u], c[p.c_off + i]);
    out[p.out_off + gi] = grads.x;
    out[p.out_off + gi + 4u] = grads.y;
  }
}

// y = a [rows, cols], g = b [rows], dOut = c [rows, cols]:
// dg[r] = sig(g) (1 - sig(g)) sum_c dOut[r, c] y[r, c] -> out. One thread per row.
@compute @workgroup_size(64)
fn sigmoid_gate_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(local_invocation_id) lid: vec3u) {
  let r = flat_index(wg, nwg, lid);
  if (r >= p.count) {
    return;
  }
  var dot = 0.0;
  for (var j = 0u; j < p.cols; j++) {
    dot += c[p.c_off + r * p.cols + j] * a[p.a_off + r * p.cols + j];
  }
  let s = sigmoid(b[p.b_off + r]);
  out[p.out_off + r] = dot * s * (1.0 - s);
}

@group(0) @binding(3) var<storage, read_write> out3: array<f32>;

// x = a, dy = b: dx = dy where -limit <= x <= limit, else 0 -> out3. One thread per entry.
@compute @workgroup_size(64)
fn clamp_backward(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    let xv = a[p.a_off + i];
    var d = 0.0;
    if (xv >= -p.scalar && xv <= p.scalar) {
      d = b[p.b_off + i];
    }
    out3[p.out_off + i] = d;
  }
}

@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// dst += a, in place, one thread per entry.
@compute @workgroup_size(64)
fn add_in_place(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    dst[p.b_off + i] += a[p.a_off + i];
  }
}

const BLOCK: u32 = 4096u; // entries per workgroup in sum_squares (256 threads x 16)
var<workgroup> part: array<f32, 256>;

// Partial sums of squares: workgroup g reduces entries [g * BLOCK, (g + 1) * BLOCK) of a
// with 256 threads (strided loads, then a shared-memory tree) into dst[out_off + g]; the
// host adds the few partials in doubles.
@compute @workgroup_size(256)
fn sum_squares(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
               @builtin(local_invocation_id) lid: vec3u) {
  let g = wg.y * nwg.x + wg.x;
  let start = g * BLOCK;
  let end = min(start + BLOCK, p.count);
  var s = 0.0;
  for (var i = start + lid.x; i < end; i += 256u) {
    let v = a[p.a_off + i];
    s += v * v;
  }
  part[lid.x] = s;
  workgroupBarrier();
  for (var stride = 128u; stride > 0u; stride /= 2u) {
    if (lid.x < stride) {
      part[lid.x] += part[lid.x + stride];
    }
    workgroupBarrier();
  }
  if (lid.x == 0u && start < p.count) {
    dst[p.out_off + g] = part[0];
  }
}
