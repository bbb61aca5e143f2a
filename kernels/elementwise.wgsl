// Elementwise ops over a flat range of `count` f32 entries, 64 threads per workgroup on a
// 2-D grid of workgroups (a 1-D grid stops at 65535 workgroups).

struct Params {
  count: u32, // entries in this dispatch
  cols: u32, // row width, for the row-wise ops
  scalar: f32, // clamp limit or scale factor
  a_off: u32, // a, b and out are bound from aligned offsets; these skip to entry 0
  b_off: u32,
  out_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// flat_index and sigmoid: elementwise_common.wgsl.

@compute @workgroup_size(64)
fn add(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
       @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    out[p.out_off + i] = a[p.a_off + i] + b[p.b_off + i];
  }
}

@compute @workgroup_size(64)
fn mul(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
       @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    out[p.out_off + i] = a[p.a_off + i] * b[p.b_off + i];
  }
}

// silu(gate) * up with gate = a, up = b.
@compute @workgroup_size(64)
fn swiglu(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
          @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    let g = a[p.a_off + i];
    out[p.out_off + i] = g * sigmoid(g) * b[p.b_off + i];
  }
}

// silu(gate) * up of a gateUp product (gate and up interleaved in runs of 4, see
// lib/backend/backend.ts ExpertStacks): output i reads gate 2i - i % 4 of a, its up value
// 4 later. Dispatches start on whole runs.
@compute @workgroup_size(64)
fn swiglu_gate_up(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                  @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    let gi = p.a_off + 2u * i - i % 4u;
    let g = a[gi];
    out[p.out_off + i] = g * sigmoid(g) * a[gi + 4u];
  }
}

@compute @workgroup_size(64)
fn clamp_abs(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
             @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    out[p.out_off + i] = clamp(a[p.a_off + i], -p.scalar, p.scalar);
  }
}

@compute @workgroup_size(64)
fn scale(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
         @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    out[p.out_off + i] = a[p.a_off + i] * p.scalar;
  }
}

// y = a [rows, cols] times sigmoid(g = b [rows, 1]) per row.
@compute @workgroup_size(64)
fn sigmoid_scale_rows(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                      @builtin(local_invocation_id) lid: vec3u) {
  let i = flat_index(wg, nwg, lid);
  if (i < p.count) {
    out[p.out_off + i] = a[p.a_off + i] * sigmoid(b[p.b_off + i / p.cols]);
  }
}
