// One AdamW step (torch.optim.AdamW: decoupled weight decay) on an f32 master weight, in
// place, one thread per entry: g = grad_scale * grad; m = b1 m + (1 - b1) g;
// v = b2 v + (1 - b2) g^2; p -= lr (wd p + (m / bc1) / (sqrt(v / bc2) + eps)).

struct Params {
  count: u32, // entries in this dispatch
  lr: f32,
  beta1: f32,
  beta2: f32,
  eps: f32,
  weight_decay: f32,
  bc1: f32, // bias corrections 1 - beta^step, computed on the host in doubles
  bc2: f32,
  grad_scale: f32,
  p_off: u32, // every tensor is bound from an aligned offset; these skip to entry 0
  g_off: u32,
  m_off: u32,
  v_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(64)
fn adamw(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
         @builtin(local_invocation_id) lid: vec3u) {
  let i = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (i >= p.count) {
    return;
  }
  let g = p.grad_scale * grad[p.g_off + i];
  let mi = p.beta1 * m[p.m_off + i] + (1.0 - p.beta1) * g;
  let vi = p.beta2 * v[p.v_off + i] + (1.0 - p.beta2) * g * g;
  m[p.m_off + i] = mi;
  v[p.v_off + i] = vi;
  let update = (mi / p.bc1) / (sqrt(vi / p.bc2) + p.eps);
  let w = param[p.p_off + i];
  param[p.p_off + i] = w - p.lr * (p.weight_decay * w + update);
}
