// Top-k routing's uniforms, logits and softmax, shared by route_topk (moe.wgsl) and
// route_topk_backward (moe_backward.wgsl; the host prepends it to both), so that the
// backward recomputes the forward's probabilities in the same arithmetic.

struct RouteParams {
  rows: u32, // tokens
  experts: u32,
  k: u32,
  normalize: u32, // 1 = the chosen weights are divided by their sum + eps
  eps: f32,
  logits_off: u32, // logits and the output are bound from aligned offsets; these skip to row 0
  out_off: u32,
}

@group(0) @binding(0) var<uniform> rp: RouteParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>; // [rows, experts]

// The softmax of the logits row at `base`: its max, and the sum of exp(logit - max).
fn softmax_stats(base: u32) -> vec2f {
  var mx = logits[base];
  for (var e = 1u; e < rp.experts; e++) {
    mx = max(mx, logits[base + e]);
  }
  var sum = 0.0;
  for (var e = 0u; e < rp.experts; e++) {
    sum += exp(logits[base + e] - mx);
  }
  return vec2f(mx, sum);
}

// Expert e's probability in the row at `base`, from its softmax_stats.
fn softmax_prob(base: u32, e: u32, stats: vec2f) -> f32 {
  return exp(logits[base + e] - stats.x) / stats.y;
}
