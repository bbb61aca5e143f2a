// Backward of causal (optionally windowed) GQA attention, probabilities recomputed from q
// and k. Two passes so no two threads ever write the same gradient entry:
//  1. attention_backward_query, one thread per (sequence, head, query i): recomputes the
//     row's max m and normaliser l, then D_i = sum_j p_ij dp_ij (dp_ij = dO_i . v_j), and
//     writes dq_i = scale * sum_j p_ij (dp_ij - D_i) k_j. (m, l, D) go to `stats`.
//  2. attention_backward_kv, one thread per (sequence, key j, kv head): loops over the
//     query heads of its GQA group and the queries that see key j, accumulating
//     dv_j += p_ij dO_i and dk_j += scale * p_ij (dp_ij - D_i) q_i in its own rows.
// Like the forward, a thread keeps its output row in global memory as the accumulator,
// so any head_dim works.

// Params and the bindings: attention_backward_common.wgsl; first_key: attention_window.wgsl. `stats` holds
// (m, l, D) per row: [seqs, heads, q_len, 3].

fn dot_rows(a_off: u32, b_off: u32) -> f32 {
  var s = 0.0;
  for (var e = 0u; e < p.head_dim; e++) {
    s += q[a_off + e] * k[b_off + e];
  }
  return s;
}

fn dot_do_v(a_off: u32, b_off: u32) -> f32 {
  var s = 0.0;
  for (var e = 0u; e < p.head_dim; e++) {
    s += d_out[a_off + e] * v[b_off + e];
  }
  return s;
}

@compute @workgroup_size(64)
fn attention_backward_query(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                            @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= p.seqs * p.heads * p.q_len) {
    return;
  }
  let i = t % p.q_len;
  let h = (t / p.q_len) % p.heads;
  let b = t / (p.q_len * p.heads);
  let kh = h / (p.heads / p.kv_heads);
  let pos = p.kv_len - p.q_len + i;
  let lo = first_key(pos);
  let hd = p.head_dim;
  let row_off = (b * p.q_len + i) * p.heads * hd + h * hd;
  let kv_width = p.kv_heads * hd;
  // max and normaliser of the row (online, as the forward)
  var m = -3.4e38;
  var l = 0.0;
  for (var j = lo; j <= pos; j++) {
    let kv = (b * p.kv_len + j) * kv_width + kh * hd;
    let s = dot_rows(p.q_off + row_off, p.k_off + kv) * p.scale;
    let m_new = max(m, s);
    l = l * exp(m - m_new) + exp(s - m_new);
    m = m_new;
  }
  // D = sum_j p_j dp_j
  var d = 0.0;
  for (var j = lo; j <= pos; j++) {
    let kv = (b * p.kv_len + j) * kv_width + kh * hd;
    let pj = exp(dot_rows(p.q_off + row_off, p.k_off + kv) * p.scale - m) / l;
    d += pj * dot_do_v(p.do_off + row_off, p.v_off + kv);
  }
  let st = p.stats_off + 3u * t;
  stats[st] = m;
  stats[st + 1u] = l;
  stats[st + 2u] = d;
  let dq_off = p.dq_off + row_off;
  for (var e = 0u; e < hd; e++) {
    dq[dq_off + e] = 0.0;
  }
  for (var j = lo; j <= pos; j++) {
    let kv = (b * p.kv_len + j) * kv_width + kh * hd;
    let pj = exp(dot_rows(p.q_off + row_off, p.k_off + kv) * p.scale - m) / l;
    let ds = pj * (dot_do_v(p.do_off + row_off, p.v_off + kv) - d) * p.scale;
    for (var e = 0u; e < hd; e++) {
      dq[dq_off + e] += ds * k[p.k_off + kv + e];
    }
  }
}

@compute @workgroup_size(64)
fn attention_backward_kv(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= p.seqs * p.kv_len * p.kv_heads) {
    return;
  }
  let kh = t % p.kv_heads;
  let j = (t / p.kv_heads) % p.kv_len;
  let b = t / (p.kv_heads * p.kv_len);
  let hd = p.head_dim;
  let group = p.heads / p.kv_heads;
  let kv = (b * p.kv_len + j) * p.kv_heads * hd + kh * hd;
  let dk_off = p.dk_off + kv;
  let dv_off = p.dv_off + kv;
  for (var e = 0u; e < hd; e++) {
    dk[dk_off + e] = 0.0;
    dv[dv_off + e] = 0.0;
  }
  // Queries (absolute positions pos = first_pos + i) that see key j: pos >= j and, with a
  // window, pos - j < window.
  let first_pos = p.kv_len - p.q_len;
  let i_lo = max(j, first_pos) - first_pos;
  var i_end = p.q_len;
  if (p.window > 0u) {
    // pos <= j + window - 1 (no query at all when that is before the first query)
    i_end = min(i_end, max(j + p.window, first_pos) - first_pos);
  }
  for (var g = 0u; g < group; g++) {
    let h = kh * group + g;
    for (var i = i_lo; i < i_end; i++) {
      let row_off = (b * p.q_len + i) * p.heads * hd + h * hd;
      let st = p.stats_off + 3u * ((b * p.heads + h) * p.q_len + i);
      let pj = exp(dot_rows(p.q_off + row_off, p.k_off + kv) * p.scale - stats_in[st]) /
        stats_in[st + 1u];
      let ds = pj * (dot_do_v(p.do_off + row_off, p.v_off + kv) - stats_in[st + 2u]) * p.scale;
      for (var e = 0u; e < hd; e++) {
        dv[dv_off + e] += pj * d_out[p.do_off + row_off + e];
        dk[dk_off + e] += ds * q[p.q_off + row_off + e];
      }
    }
  }
}
