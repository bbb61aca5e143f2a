// Backward of causal (optionally windowed) GQA attention, tiled the FlashAttention-2 way
// (kernels/attention_backward.wgsl is the readable one-thread-per-row baseline: same
// maths; both take Params, bindings and first_key from attention_backward_common.wgsl).
// With p_ij = softmax_j(scale q_i . k_j), dp_ij = dO_i . v_j and D_i = sum_j p_ij dp_ij:
//   ds_ij = p_ij (dp_ij - D_i) scale,  dq_i = sum_j ds_ij k_j,
//   dk_j = sum_i ds_ij q_i,            dv_j = sum_i p_ij dO_i.
// Two kernels, so that every gradient row has one owner and no atomics are needed:
//
//  1. attention_backward_query: a workgroup owns a block of ROWS (query, head) rows of one
//     (sequence, kv head), flattened as the forward does (f = query * group + head), so
//     the heads of a GQA group share the K and V tiles. It walks the keys the block can
//     see, in tiles of TILE keys (K and V in workgroup memory), twice:
//       - first for the row statistics: the running max m, normaliser l and
//         D~ = sum_j exp(s_j - m) dp_j (s_j = scale q . k_j), the last two rescaled
//         together when m grows (once per tile), so D = D~ / l; lse = m + log l and D
//         go to `stats`;
//       - then for dq: p = exp(s - lse), ds as above, dq += ds k_j.
//     With SAVED_STATS (training after the tiled forward), `stats` already holds each
//     row's lse (the forward's SAVE_STATS) and D = dO_i . O_i (the forward's output, the
//     FlashAttention-2 way: sum_j p_ij dp_ij = dO_i . sum_j p_ij v_j), so walk 0 is
//     skipped: the query pass walks the keys once, writing D for the key pass.
//  2. attention_backward_kv: a workgroup owns a block of ROWS key rows of one (sequence,
//     kv head), and walks the (query, head) rows that see any of them (causal, and
//     within the window) in tiles of TILE rows: Q, dO and their (lse, D) in workgroup
//     memory; dv += p dO_i, dk += ds q_i.
//
// Threads: GROUPS groups of LANES, as in attention_tiled.wgsl. A group owns R rows (slots
// g, g + GROUPS, ...) and each of its lanes every LANES-th vec4 of those rows (q, dO and
// the dq accumulator; or k, v, dk and dv) in registers: head_dim up to
// LANES * MAX_VEC4S * 4 = 256 with 8 lanes. Each vec4 read from a tile feeds R rows.
// The lanes' partial dot products (q . k and dO . v together, as a vec2) meet in
// workgroup memory; every lane of a group sums them in the same order, so the lanes
// agree on p and ds.
// Tiles outside the block's causal / window range are never loaded; inside a tile, keys
// a row does not see weigh 0 (a select: every thread runs the same loop and barriers).
//
// Workgroup memory (the host picks TILE so it fits WebGPU's default 16 KiB): the query
// pass a K and a V tile of TILE rows of ROW_VEC4S vec4s (zero-padded past HEAD_DIM, so
// the inner loops need no bounds checks) and the partials; the key pass a Q and a dO
// tile, their (lse, D), and the partials.
//
// `stats`: (lse, D) per (query, head) row, [seqs * q_len, heads, 2].

// Params and the bindings: attention_backward_common.wgsl; first_key:
// attention_window.wgsl; the thread layout (HEAD_DIM, LANES, GROUPS, R, ROWS, VEC4S,
// ROW_VEC4S) and q4, k4, v4: attention_tiles.wgsl.

// Pipeline constants (with attention_tiles.wgsl's HEAD_DIM and LANES).
override TILE: u32 = 8u; // keys (query pass) or (query, head) rows (key pass) per tile
override SAVED_STATS: u32 = 0u;

const MAX_TILE: u32 = 16u; // the host keeps TILE within it

// The query pass's K and V tiles.
var<workgroup> k_tile: array<vec4f, TILE * ROW_VEC4S>;
var<workgroup> v_tile: array<vec4f, TILE * ROW_VEC4S>;
// The key pass's Q and dO tiles and their rows' (lse, D).
var<workgroup> q_tile: array<vec4f, TILE * ROW_VEC4S>;
var<workgroup> do_tile: array<vec4f, TILE * ROW_VEC4S>;
var<workgroup> stats_tile: array<vec2f, TILE>;
// Both: each thread's share of (q . k, dO . v) per row of its group and tile row.
var<workgroup> partial: array<vec2f, THREADS * R * TILE>;

// Dimensions d .. d + 3 of the head row at `base` (zero past HEAD_DIM), from d_out or
// out_saved, as attention_tiles.wgsl's q4, k4, v4.
fn do4(base: u32, d: u32) -> vec4f {
  var r = vec4f(0.0);
  for (var c = 0u; c < 4u; c++) {
    if (d + c < HEAD_DIM) {
      r[c] = d_out[base + d + c];
    }
  }
  return r;
}

fn o4(base: u32, d: u32) -> vec4f {
  var r = vec4f(0.0);
  for (var c = 0u; c < 4u; c++) {
    if (d + c < HEAD_DIM) {
      r[c] = out_saved[base + d + c];
    }
  }
  return r;
}

// Row r of group g: its (q . k, dO . v) with tile row x, the lanes' partials summed.
fn dots(g: u32, r: u32, x: u32) -> vec2f {
  var sum = vec2f(0.0);
  for (var ln = 0u; ln < LANES; ln++) {
    sum += partial[((g * LANES + ln) * R + r) * TILE + x];
  }
  return sum;
}

// The head row (of q, d_out, dq and stats) of (query, head) row f of kv head kh of
// sequence b.
fn head_row(b: u32, kh: u32, f: u32, group: u32) -> u32 {
  return (b * p.q_len + f / group) * p.heads + kh * group + f % group;
}

@compute @workgroup_size(64)
fn attention_backward_query(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                            @builtin(local_invocation_id) lid: vec3u) {
  let group = p.heads / p.kv_heads; // query heads per kv head
  let query_rows = p.q_len * group; // (query, head) rows of one (sequence, kv head)
  let blocks = (query_rows + ROWS - 1u) / ROWS;
  let block = wg.y * nwg.x + wg.x;
  // Uniform control flow: the whole workgroup shares `block`, so this exit is safe.
  if (block >= p.seqs * p.kv_heads * blocks) {
    return;
  }
  let kh = (block / blocks) % p.kv_heads;
  let b = block / (blocks * p.kv_heads);
  let f0 = (block % blocks) * ROWS;
  let f_end = min(f0 + ROWS, query_rows);

  let tid = lid.x;
  let g = tid / LANES;
  let lane = tid % LANES;
  let first = p.kv_len - p.q_len; // absolute position of query 0
  // Keys any row of the block sees (a uniform range: every thread walks the same tiles).
  let block_lo = first_key(first + f0 / group);
  let block_hi = first + (f_end - 1u) / group;
  let kv_width = p.kv_heads * HEAD_DIM;
  let kv_base = b * p.kv_len * kv_width + kh * HEAD_DIM;

  // Row r of this group is slot r * GROUPS + g of the block. Slots past the last row
  // repeat it (loads stay in bounds) and write nothing.
  var pos: array<u32, R>; // absolute position of the row's query
  var lo: array<u32, R>; // its first visible key
  var row: array<u32, R>; // its head row (of q, d_out, dq and stats)
  var writes: array<bool, R>;
  var qr: array<vec4f, R * MAX_VEC4S>; // zero past HEAD_DIM
  var dor: array<vec4f, R * MAX_VEC4S>;
  var dqr: array<vec4f, R * MAX_VEC4S>;
  var m: array<f32, R>;
  var l: array<f32, R>;
  var d: array<f32, R>; // D~, then D
  for (var r = 0u; r < R; r++) {
    let slot = r * GROUPS + g;
    writes[r] = f0 + slot < f_end;
    let f = min(f0 + slot, f_end - 1u);
    pos[r] = first + f / group;
    lo[r] = first_key(pos[r]);
    row[r] = head_row(b, kh, f, group);
    for (var c = 0u; c < VEC4S; c++) {
      let dim = 4u * (lane + c * LANES);
      qr[r * MAX_VEC4S + c] = q4(p.q_off + row[r] * HEAD_DIM, dim);
      dor[r * MAX_VEC4S + c] = do4(p.do_off + row[r] * HEAD_DIM, dim);
      dqr[r * MAX_VEC4S + c] = vec4f(0.0);
    }
    // Key pos is in the block's range, so m ends finite and l >= 1; until a row sees a
    // key it keeps m = NO_SCORE and l = D~ = 0.
    m[r] = NO_SCORE;
    l[r] = 0.0;
    d[r] = 0.0;
  }

  // Two walks over the same K and V tiles: walk 0 for m, l and D~, walk 1 for dq. With
  // the forward's lse, D = dO . O (the lanes' shares summed through `partial`) instead
  // of walk 0.
  var lse: array<f32, R>;
  if (SAVED_STATS == 1u) {
    for (var r = 0u; r < R; r++) {
      var share = 0.0;
      for (var c = 0u; c < VEC4S; c++) {
        let o_row = o4(p.o_off + row[r] * HEAD_DIM, 4u * (lane + c * LANES));
        share += dot(dor[r * MAX_VEC4S + c], o_row);
      }
      partial[(tid * R + r) * TILE] = vec2f(share, 0.0);
    }
    workgroupBarrier();
    for (var r = 0u; r < R; r++) {
      lse[r] = stats[p.stats_off + 2u * row[r]];
      d[r] = dots(g, r, 0u).x;
      if (writes[r] && lane == 0u) {
        stats[p.stats_off + 2u * row[r] + 1u] = d[r];
      }
    }
    workgroupBarrier(); // the tiles overwrite `partial`
  }
  for (var walk = SAVED_STATS; walk < 2u; walk++) {
    for (var j0 = block_lo; j0 <= block_hi; j0 += TILE) {
      let n = min(TILE, block_hi + 1u - j0); // keys in this tile
      for (var e = tid; e < n * ROW_VEC4S; e += THREADS) {
        let key_row = kv_base + (j0 + e / ROW_VEC4S) * kv_width; // where it starts
        let dim = 4u * (e % ROW_VEC4S);
        k_tile[e] = k4(p.k_off + key_row, dim);
        v_tile[e] = v4(p.v_off + key_row, dim);
      }
      workgroupBarrier();
      // This thread's share of (q . k, dO . v) for its rows and every key of the tile (a
      // key past the tile repeats the last one; it is masked below).
      for (var x = 0u; x < TILE; x++) {
        let t = min(x, n - 1u);
        var dot_r: array<vec2f, R>;
        for (var r = 0u; r < R; r++) {
          dot_r[r] = vec2f(0.0); // naga zeroes a var declared in a loop only once
        }
        for (var c = 0u; c < VEC4S; c++) {
          let key = k_tile[t * ROW_VEC4S + lane + c * LANES];
          let value = v_tile[t * ROW_VEC4S + lane + c * LANES];
          for (var r = 0u; r < R; r++) {
            dot_r[r] += vec2f(dot(qr[r * MAX_VEC4S + c], key),
                              dot(dor[r * MAX_VEC4S + c], value));
          }
        }
        for (var r = 0u; r < R; r++) {
          partial[(tid * R + r) * TILE + x] = dot_r[r];
        }
      }
      workgroupBarrier();
      if (walk == 0u) {
        for (var r = 0u; r < R; r++) {
          // This row's (score, dp) for the tile's keys; masked keys score NO_SCORE.
          var scored: array<vec2f, MAX_TILE>;
          var tile_max = NO_SCORE;
          for (var x = 0u; x < TILE; x++) {
            let j = j0 + x;
            let sd = dots(g, r, x);
            let visible = x < n && j >= lo[r] && j <= pos[r];
            scored[x] = vec2f(select(NO_SCORE, sd.x * p.scale, visible), sd.y);
            tile_max = max(tile_max, scored[x].x);
          }
          let m_new = max(m[r], tile_max);
          let correction = exp(m[r] - m_new);
          l[r] *= correction;
          d[r] *= correction;
          m[r] = m_new;
          for (var x = 0u; x < TILE; x++) {
            let weight = select(0.0, exp(scored[x].x - m_new), scored[x].x > NO_SCORE);
            l[r] += weight;
            d[r] += weight * scored[x].y;
          }
        }
      } else {
        for (var x = 0u; x < TILE; x++) {
          let j = j0 + x;
          var ds: array<f32, R>;
          for (var r = 0u; r < R; r++) {
            let sd = dots(g, r, x);
            let visible = x < n && j >= lo[r] && j <= pos[r];
            let prob = select(0.0, exp(sd.x * p.scale - lse[r]), visible);
            ds[r] = prob * (sd.y - d[r]) * p.scale;
          }
          // A key past the tile reads the last one again; its ds is 0.
          let t = min(x, n - 1u);
          for (var c = 0u; c < VEC4S; c++) {
            let key = k_tile[t * ROW_VEC4S + lane + c * LANES];
            for (var r = 0u; r < R; r++) {
              dqr[r * MAX_VEC4S + c] += ds[r] * key;
            }
          }
        }
      }
      workgroupBarrier(); // the next tile overwrites the tiles and `partial`
    }
    if (walk == 0u) {
      for (var r = 0u; r < R; r++) {
        lse[r] = m[r] + log(l[r]);
        d[r] /= l[r];
        if (writes[r] && lane == 0u) {
          stats[p.stats_off + 2u * row[r]] = lse[r];
          stats[p.stats_off + 2u * row[r] + 1u] = d[r];
        }
      }
    }
  }

  for (var r = 0u; r < R; r++) {
    if (writes[r]) {
      let dq_row = p.dq_off + row[r] * HEAD_DIM;
      for (var c = 0u; c < VEC4S; c++) {
        let dim = 4u * (lane + c * LANES);
        for (var t = 0u; t < 4u; t++) {
          if (dim + t < HEAD_DIM) {
            dq[dq_row + dim + t] = dqr[r * MAX_VEC4S + c][t];
          }
        }
      }
    }
  }
}

@compute @workgroup_size(64)
fn attention_backward_kv(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                         @builtin(local_invocation_id) lid: vec3u) {
  let group = p.heads / p.kv_heads;
  let blocks = (p.kv_len + ROWS - 1u) / ROWS;
  let block = wg.y * nwg.x + wg.x;
  // Uniform control flow: the whole workgroup shares `block`, so this exit is safe.
  if (block >= p.seqs * p.kv_heads * blocks) {
    return;
  }
  let kh = (block / blocks) % p.kv_heads;
  let b = block / (blocks * p.kv_heads);
  let j_first = (block % blocks) * ROWS; // the block's keys: [j_first, j_end)
  let j_end = min(j_first + ROWS, p.kv_len);

  let tid = lid.x;
  let g = tid / LANES;
  let lane = tid % LANES;
  let first = p.kv_len - p.q_len; // absolute position of query 0
  // Queries that see some key of the block: positions pos_lo ..= pos_hi (none when
  // pos_hi < pos_lo: a window that ends before the first query), the (query, head) rows
  // [f_lo, f_hi). A uniform range, as in the query pass.
  let pos_lo = max(j_first, first);
  var pos_hi = p.kv_len - 1u;
  if (p.window > 0u) {
    pos_hi = min(pos_hi, j_end - 1u + p.window - 1u);
  }
  let f_lo = (pos_lo - first) * group;
  let f_hi = select(f_lo, (pos_hi + 1u - first) * group, pos_hi >= pos_lo);
  let kv_width = p.kv_heads * HEAD_DIM;

  // Row r of this group is slot r * GROUPS + g, key j_first + slot; slots past the last
  // key repeat it and write nothing.
  var key: array<u32, R>; // the row's key (its absolute position)
  var kv_row: array<u32, R>; // where its head row starts in k, v, dk and dv
  var writes: array<bool, R>;
  var kr: array<vec4f, R * MAX_VEC4S>; // zero past HEAD_DIM
  var vr: array<vec4f, R * MAX_VEC4S>;
  var dkr: array<vec4f, R * MAX_VEC4S>;
  var dvr: array<vec4f, R * MAX_VEC4S>;
  for (var r = 0u; r < R; r++) {
    let slot = r * GROUPS + g;
    writes[r] = j_first + slot < j_end;
    key[r] = min(j_first + slot, j_end - 1u);
    kv_row[r] = (b * p.kv_len + key[r]) * kv_width + kh * HEAD_DIM;
    for (var c = 0u; c < VEC4S; c++) {
      let dim = 4u * (lane + c * LANES);
      kr[r * MAX_VEC4S + c] = k4(p.k_off + kv_row[r], dim);
      vr[r * MAX_VEC4S + c] = v4(p.v_off + kv_row[r], dim);
      dkr[r * MAX_VEC4S + c] = vec4f(0.0);
      dvr[r * MAX_VEC4S + c] = vec4f(0.0);
    }
  }

  for (var f0 = f_lo; f0 < f_hi; f0 += TILE) {
    let n = min(TILE, f_hi - f0); // (query, head) rows in this tile
    for (var e = tid; e < n * ROW_VEC4S; e += THREADS) {
      let query_row = head_row(b, kh, f0 + e / ROW_VEC4S, group) * HEAD_DIM; // its start
      let dim = 4u * (e % ROW_VEC4S);
      q_tile[e] = q4(p.q_off + query_row, dim);
      do_tile[e] = do4(p.do_off + query_row, dim);
    }
    if (tid < n) { // TILE <= MAX_TILE < THREADS
      let st = p.stats_off + 2u * head_row(b, kh, f0 + tid, group);
      stats_tile[tid] = vec2f(stats_in[st], stats_in[st + 1u]);
    }
    workgroupBarrier();
    // This thread's share of (k . q, v . dO) for its rows and every row of the tile (a
    // row past the tile repeats the last one; it is masked below).
    for (var x = 0u; x < TILE; x++) {
      let t = min(x, n - 1u);
      var dot_r: array<vec2f, R>;
      for (var r = 0u; r < R; r++) {
        dot_r[r] = vec2f(0.0); // naga zeroes a var declared in a loop only once
      }
      for (var c = 0u; c < VEC4S; c++) {
        let query_vec = q_tile[t * ROW_VEC4S + lane + c * LANES];
        let do_vec = do_tile[t * ROW_VEC4S + lane + c * LANES];
        for (var r = 0u; r < R; r++) {
          dot_r[r] += vec2f(dot(kr[r * MAX_VEC4S + c], query_vec),
                            dot(vr[r * MAX_VEC4S + c], do_vec));
        }
      }
      for (var r = 0u; r < R; r++) {
        partial[(tid * R + r) * TILE + x] = dot_r[r];
      }
    }
    workgroupBarrier();
    for (var x = 0u; x < TILE; x++) {
      let t = min(x, n - 1u);
      let pos = first + (f0 + x) / group; // the tile row's query position
      let lo = first_key(pos);
      let lse_d = stats_tile[t];
      var prob: array<f32, R>;
      var ds: array<f32, R>;
      for (var r = 0u; r < R; r++) {
        let sd = dots(g, r, x);
        let visible = x < n && key[r] >= lo && key[r] <= pos;
        prob[r] = select(0.0, exp(sd.x * p.scale - lse_d.x), visible);
        ds[r] = prob[r] * (sd.y - lse_d.y) * p.scale;
      }
      for (var c = 0u; c < VEC4S; c++) {
        let query_vec = q_tile[t * ROW_VEC4S + lane + c * LANES];
        let do_vec = do_tile[t * ROW_VEC4S + lane + c * LANES];
        for (var r = 0u; r < R; r++) {
          dvr[r * MAX_VEC4S + c] += prob[r] * do_vec;
          dkr[r * MAX_VEC4S + c] += ds[r] * query_vec;
        }
      }
    }
    workgroupBarrier(); // the next tile overwrites the tiles and `partial`
  }

  for (var r = 0u; r < R; r++) {
    if (writes[r]) {
      for (var c = 0u; c < VEC4S; c++) {
        let dim = 4u * (lane + c * LANES);
        for (var t = 0u; t < 4u; t++) {
          if (dim + t < HEAD_DIM) {
            dk[p.dk_off + kv_row[r] + dim + t] = dkr[r * MAX_VEC4S + c][t];
            dv[p.dv_off + kv_row[r] + dim + t] = dvr[r * MAX_VEC4S + c][t];
          }
        }
      }
    }
  }
}
