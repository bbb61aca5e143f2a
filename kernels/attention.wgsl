// Causal GQA attention, one thread per (sequence, head, query). Online softmax over the
// visible keys: a running max m and normaliser l, the output row rescaled whenever m
// grows, so no row of scores is ever stored. The thread owns its output row and uses it
// as the accumulator, which keeps any head_dim working.

// Params and the bindings: attention_common.wgsl; first_key: attention_window.wgsl.

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
             @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= p.seqs * p.heads * p.q_len) {
    return;
  }
  let i = t % p.q_len;
  let h = (t / p.q_len) % p.heads;
  let b = t / (p.q_len * p.heads);
  let kh = h / (p.heads / p.kv_heads);
  let pos = p.kv_len - p.q_len + i; // absolute position of this query
  let lo = first_key(pos);
  let hd = p.head_dim;
  let row_off = (b * p.q_len + i) * p.heads * hd + h * hd;
  let q_off = p.q_off + row_off;
  let out_off = p.out_off + row_off;
  let kv_width = p.kv_heads * hd;
  for (var e = 0u; e < hd; e++) {
    out[out_off + e] = 0.0;
  }
  // Key `pos` is always visible, so m is finite after the first key and the initial
  // correction exp(-3.4e38 - s) is exactly 0.
  var m = -3.4e38;
  var l = 0.0;
  for (var j = lo; j <= pos; j++) {
    let kv_off = (b * p.kv_stride + j) * kv_width + kh * hd;
    let k_off = p.k_off + kv_off;
    let v_off = p.v_off + kv_off;
    var dot = 0.0;
    for (var e = 0u; e < hd; e++) {
      dot += q[q_off + e] * k[k_off + e];
    }
    let s = dot * p.scale;
    let m_new = max(m, s);
    let correction = exp(m - m_new);
    let weight = exp(s - m_new);
    l = l * correction + weight;
    for (var e = 0u; e < hd; e++) {
      out[out_off + e] = out[out_off + e] * correction + weight * v[v_off + e];
    }
    m = m_new;
  }
  let inv_l = 1.0 / l;
  for (var e = 0u; e < hd; e++) {
    out[out_off + e] *= inv_l;
  }
}
