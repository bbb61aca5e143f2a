// Softmax cross-entropy with an ignore index: logits [rows, vocab], targets [rows].
// loss_r = log(sum_j exp(l_j - max)) + max - l_target; dlogits = g (softmax - onehot)
// on counted rows, 0 on ignored ones.

struct Params {
  rows: u32,
  vocab: u32,
  grad_scale: f32, // g
  ignore_index: i32,
  first: u32, // targets[first] / losses[first] belong to this dispatch's row 0
  logits_off: u32, // logits and dlogits are bound from aligned offsets; these skip to row 0
  out_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>; // [rows, vocab]
@group(0) @binding(2) var<storage, read> targets: array<i32>; // all rows
@group(0) @binding(3) var<storage, read_write> d_logits: array<f32>; // [rows, vocab]
@group(0) @binding(4) var<storage, read_write> losses: array<f32>; // all rows

const THREADS: u32 = 256u;
var<workgroup> part: array<f32, 256>;

// One workgroup per row (vocabularies are large): 256 threads reduce the max, then the sum
// of exponentials, in shared memory, then write the row of dlogits. The per-row losses go
// to the host, which averages them in doubles.
@compute @workgroup_size(256)
fn cross_entropy(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                 @builtin(local_invocation_id) lid: vec3u) {
  let row = wg.y * nwg.x + wg.x;
  // Uniform control flow: every thread of a workgroup shares `row`.
  if (row >= p.rows) {
    return;
  }
  let base = p.logits_off + row * p.vocab;
  var mx = -3.4e38;
  for (var j = lid.x; j < p.vocab; j += THREADS) {
    mx = max(mx, logits[base + j]);
  }
  part[lid.x] = mx;
  workgroupBarrier();
  for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
    if (lid.x < stride) {
      part[lid.x] = max(part[lid.x], part[lid.x + stride]);
    }
    workgroupBarrier();
  }
  mx = part[0];
  workgroupBarrier();
  var s = 0.0;
  for (var j = lid.x; j < p.vocab; j += THREADS) {
    s += exp(logits[base + j] - mx);
  }
  part[lid.x] = s;
  workgroupBarrier();
  for (var stride = THREADS / 2u; stride > 0u; stride /= 2u) {
    if (lid.x < stride) {
      part[lid.x] += part[lid.x + stride];
    }
    workgroupBarrier();
  }
  let sum = part[0];
  // No barrier below, so branching on the (storage-loaded) target is fine.
  let tgt = targets[p.first + row];
  let out = p.out_off + row * p.vocab;
  if (tgt == p.ignore_index) {
    for (var j = lid.x; j < p.vocab; j += THREADS) {
      d_logits[out + j] = 0.0;
    }
    if (lid.x == 0u) {
      losses[p.first + row] = 0.0;
    }
    return;
  }
  let g = p.grad_scale;
  for (var j = lid.x; j < p.vocab; j += THREADS) {
    var d = g * (exp(logits[base + j] - mx) / sum);
    if (j == u32(tgt)) {
      d -= g;
    }
    d_logits[out + j] = d;
  }
  if (lid.x == 0u) {
    losses[p.first + row] = log(sum) + mx - logits[base + u32(tgt)];
  }
}
