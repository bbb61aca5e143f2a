// Shared by elementwise.wgsl and elementwise_backward.wgsl (the host prepends it): the flat
// index of a thread on the 2-D grid, and the sigmoid both directions of SwiGLU and the
// sigmoid gate must agree on. Their Params and bindings differ (three tensors forward,
// five backward), so each file keeps its own.

fn flat_index(wg: vec3u, nwg: vec3u, lid: vec3u) -> u32 {
  return (wg.y * nwg.x + wg.x) * 64u + lid.x;
}

// Overflow-free sigmoid: exp of a large positive number never appears.
fn sigmoid(v: f32) -> f32 {
  if (v >= 0.0) {
    return 1.0 / (1.0 + exp(-v));
  }
  let e = exp(v);
  return e / (1.0 + e);
}
