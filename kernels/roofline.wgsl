// The f32 peak probe of `deno task bench`'s roofline: what the device does at best, so
// that the matmul ladder can be reported as a fraction of it (WebGPU exposes neither a
// device's f32 peak nor its memory bandwidth; the bench measures the bandwidth with buffer
// copies). Not used by any model. fma_peak: 8 independent vec4 FMA chains a thread, in
// registers, so the FMA latency hides and no memory is touched but one write at the end.

struct Params {
  count: u32, // threads that write
  iterations: u32, // FMAs a chain
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

// Component j of chain c of thread t starts at (t + c) / 2^20 + j / 2^22 (distinct, so a
// compiler that splits the vec4s cannot merge them) and runs x = x * 0.5 + 0.25: exact in
// f32, fused or not (x * 0.5 is exact), and at its fixed point 0.5 after a few dozen
// steps. So the test knows every value, and the loop cannot be folded away as
// p.iterations is a uniform.
@compute @workgroup_size(256)
fn fma_peak(@builtin(global_invocation_id) gid: vec3u) {
  // Eight chains as eight variables, not an array, so that no compiler keeps them in memory.
  let base = vec4f(f32(gid.x) / 1048576.0) + vec4f(0.0, 1.0, 2.0, 3.0) / 4194304.0;
  let step = 1.0 / 1048576.0;
  var c0 = base;
  var c1 = base + step;
  var c2 = base + 2.0 * step;
  var c3 = base + 3.0 * step;
  var c4 = base + 4.0 * step;
  var c5 = base + 5.0 * step;
  var c6 = base + 6.0 * step;
  var c7 = base + 7.0 * step;
  let scale = vec4f(0.5);
  let shift = vec4f(0.25);
  for (var i = 0u; i < p.iterations; i++) {
    c0 = fma(c0, scale, shift);
    c1 = fma(c1, scale, shift);
    c2 = fma(c2, scale, shift);
    c3 = fma(c3, scale, shift);
    c4 = fma(c4, scale, shift);
    c5 = fma(c5, scale, shift);
    c6 = fma(c6, scale, shift);
    c7 = fma(c7, scale, shift);
  }
  let total = ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7));
  if (gid.x < p.count) {
    out[gid.x] = total.x + total.y + total.z + total.w;
  }
}
