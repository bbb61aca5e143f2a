// Causal GQA attention tiled the FlashAttention-2 way (kernels/attention.wgsl is the
// readable one-thread-per-query baseline; same maths, and both take their Params and
// bindings from attention_common.wgsl).
//
// A workgroup owns one block of query rows of one (sequence, kv head): the rows are the
// (query, head) pairs of that kv head's GQA group, flattened as f = query * group + head,
// so the heads that share K and V share their tiles too. Keys are walked in tiles of KEYS:
// K, then V, are loaded cooperatively into workgroup memory and read by every row of the
// block. Each row keeps a running max m, normaliser l and output accumulator o in
// registers (online softmax, rescaled once per tile), so no score matrix is stored.
// Tiles outside the block's causal / sliding-window range are never loaded.
//
// Threads: GROUPS groups of LANES (4, or 8 past head_dim 128, so that a thread holds at
// most MAX_VEC4S vec4s of a row: with 16, llvmpipe kept the loops over them and head_dim
// 256 was wrong from 2,048 keys, and a GPU would spill the registers). A group owns R
// rows (slots g, g + GROUPS, ...) and each of its lanes every LANES-th vec4 of their q
// and o (head_dim up to 8 * MAX_VEC4S * 4 = 256), so each vec4 read from the tile feeds
// R rows. The lanes' partial dot products meet in workgroup memory.
// Few query rows (decode: qLen 1) would leave most groups idle, so SPLIT groups may share
// one query row, each taking every SPLIT-th key of a tile (flash-decoding inside the
// workgroup); their (m, l, o) are merged at the end.
//
// Workgroup memory (the host keeps it within WebGPU's default 16 KiB): a K or V tile of
// KEYS rows of ROW_VEC4S vec4s (zero-padded to whole vec4s per lane, so the inner loops
// need no bounds checks), which doubles as the merge buffer, and the partial dots
// [THREADS, R, ROW_KEYS].

// Params and the bindings: attention_common.wgsl; first_key: attention_window.wgsl; the
// thread layout (HEAD_DIM, LANES, GROUPS, R, ROWS, VEC4S, ROW_VEC4S) and q4, k4, v4:
// attention_tiles.wgsl.
//
// SAVE_STATS (training): each (query, head) row's logsumexp also goes to row_stats, laid
// out as the tiled backward's statistics [seqs * q_len, heads, 2] (slot 0; the backward
// writes D into slot 1), so the backward's query pass need not walk the keys for it.

// Pipeline constants (with attention_tiles.wgsl's HEAD_DIM and LANES), so the per-thread
// loops have fixed trip counts and q, o stay in registers.
override KEYS: u32 = 16u; // keys per tile
override SPLIT: u32 = 1u; // groups per query row: a power of two up to GROUPS
override SAVE_STATS: u32 = 0u;

@group(0) @binding(5) var<storage, read_write> row_stats: array<f32>;

override ROW_KEYS: u32 = (KEYS + SPLIT - 1u) / SPLIT; // keys of a tile per group
override TILE_VEC4S: u32 = max(KEYS, select(0u, GROUPS / 2u, SPLIT > 1u)) * ROW_VEC4S;

var<workgroup> tile: array<vec4f, TILE_VEC4S>;
var<workgroup> partial: array<f32, THREADS * R * ROW_KEYS>;

@compute @workgroup_size(64)
fn attention_tiled(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
                   @builtin(local_invocation_id) lid: vec3u) {
  let group = p.heads / p.kv_heads; // query heads per kv head
  let query_rows = p.q_len * group; // (query, head) rows of one (sequence, kv head)
  let rows_per_block = ROWS / SPLIT;
  let blocks = (query_rows + rows_per_block - 1u) / rows_per_block;
  let block = wg.y * nwg.x + wg.x;
  // Uniform control flow: the whole workgroup shares `block`, so this exit is safe.
  if (block >= p.seqs * p.kv_heads * blocks) {
    return;
  }
  let kh = (block / blocks) % p.kv_heads;
  let b = block / (blocks * p.kv_heads);
  let f0 = (block % blocks) * rows_per_block;
  let f_end = min(f0 + rows_per_block, query_rows);

  let tid = lid.x;
  let g = tid / LANES;
  let lane = tid % LANES;
  let split = g % SPLIT; // the same for all R rows of the group
  let first = p.kv_len - p.q_len; // absolute position of query 0
  // Keys any row of the block sees (a uniform range: every thread walks the same tiles).
  let block_lo = first_key(first + f0 / group);
  let block_hi = first + (f_end - 1u) / group;
  let q_width = p.heads * HEAD_DIM;
  let kv_width = p.kv_heads * HEAD_DIM;
  let kv_base = b * p.kv_stride * kv_width + kh * HEAD_DIM;

  // Row r of this group is slot r * GROUPS + g, query row slot / SPLIT of the block. Slots
  // past the last query row repeat it (loads stay in bounds) and write nothing.
  var pos: array<u32, R>; // absolute position of the row's query
  var lo: array<u32, R>; // its first visible key
  var row_off: array<u32, R>; // its head row in q and out
  var writes: array<bool, R>;
  var qr: array<vec4f, R * MAX_VEC4S>; // zero past HEAD_DIM
  var o: array<vec4f, R * MAX_VEC4S>;
  var m: array<f32, R>;
  var l: array<f32, R>;
  for (var r = 0u; r < R; r++) {
    let slot = r * GROUPS + g;
    writes[r] = f0 + slot / SPLIT < f_end;
    let f = min(f0 + slot / SPLIT, f_end - 1u);
    let i = f / group;
    pos[r] = first + i;
    lo[r] = first_key(pos[r]);
    row_off[r] = (b * p.q_len + i) * q_width + (kh * group + f % group) * HEAD_DIM;
    for (var c = 0u; c < VEC4S; c++) {
      qr[r * MAX_VEC4S + c] = q4(p.q_off + row_off[r], 4u * (lane + c * LANES));
    }
    // Key pos is seen by some group of this query row, so the merged m is finite; a row
    // that has seen nothing yet keeps m = NO_SCORE and l = 0.
    m[r] = NO_SCORE;
  }

  for (var j0 = block_lo; j0 <= block_hi; j0 += KEYS) {
    let n = min(KEYS, block_hi + 1u - j0); // keys in this tile
    for (var e = tid; e < n * ROW_VEC4S; e += THREADS) {
      let key_row = p.k_off + kv_base + (j0 + e / ROW_VEC4S) * kv_width;
      tile[e] = k4(key_row, 4u * (e % ROW_VEC4S));
    }
    workgroupBarrier();
    // This thread's share of q . k for its rows and the group's keys of the tile (a key
    // past the tile reads the last one again; it is masked below).
    for (var x = 0u; x < ROW_KEYS; x++) {
      let t = min(x * SPLIT + split, n - 1u);
      var qk: array<f32, R>;
      for (var r = 0u; r < R; r++) {
        qk[r] = 0.0; // naga zeroes a var declared in a loop only once
      }
      for (var c = 0u; c < VEC4S; c++) {
        let key = tile[t * ROW_VEC4S + lane + c * LANES];
        for (var r = 0u; r < R; r++) {
          qk[r] += dot(qr[r * MAX_VEC4S + c], key);
        }
      }
      for (var r = 0u; r < R; r++) {
        partial[(tid * R + r) * ROW_KEYS + x] = qk[r];
      }
    }
    workgroupBarrier();
    for (var e = tid; e < n * ROW_VEC4S; e += THREADS) {
      let value_row = p.v_off + kv_base + (j0 + e / ROW_VEC4S) * kv_width;
      tile[e] = v4(value_row, 4u * (e % ROW_VEC4S));
    }
    workgroupBarrier();
    // Scores: every lane of a group sums the partials in the same order, so the lanes
    // agree on m and l. Masked keys weigh 0 (a select, not a branch: every row runs the
    // same loads). One rescale of o per row for the whole tile.
    var m_new: array<f32, R>;
    for (var r = 0u; r < R; r++) {
      var tile_max = NO_SCORE;
      for (var x = 0u; x < ROW_KEYS; x++) {
        let j = j0 + x * SPLIT + split;
        var qk = 0.0;
        for (var ln = 0u; ln < LANES; ln++) {
          qk += partial[((g * LANES + ln) * R + r) * ROW_KEYS + x];
        }
        let visible = j < j0 + n && j >= lo[r] && j <= pos[r];
        tile_max = max(tile_max, select(NO_SCORE, qk * p.scale, visible));
      }
      m_new[r] = max(m[r], tile_max);
      let correction = exp(m[r] - m_new[r]);
      l[r] *= correction;
      for (var c = 0u; c < VEC4S; c++) {
        o[r * MAX_VEC4S + c] *= correction;
      }
      m[r] = m_new[r];
    }
    for (var x = 0u; x < ROW_KEYS; x++) {
      let t = x * SPLIT + split;
      let j = j0 + t;
      var weight: array<f32, R>;
      for (var r = 0u; r < R; r++) {
        var qk = 0.0;
        for (var ln = 0u; ln < LANES; ln++) {
          qk += partial[((g * LANES + ln) * R + r) * ROW_KEYS + x];
        }
        let visible = t < n && j >= lo[r] && j <= pos[r];
        weight[r] = select(0.0, exp(qk * p.scale - m[r]), visible);
        l[r] += weight[r];
      }
      for (var c = 0u; c < VEC4S; c++) {
        let value = tile[min(t, n - 1u) * ROW_VEC4S + lane + c * LANES];
        for (var r = 0u; r < R; r++) {
          o[r * MAX_VEC4S + c] += weight[r] * value;
        }
      }
    }
    workgroupBarrier(); // the next tile overwrites tile and partial
  }

  if (SPLIT > 1u) {
    // Bring the SPLIT groups of each query row to their common max and total l ...
    if (lane == 0u) {
      for (var r = 0u; r < R; r++) {
        let slot = r * GROUPS + g;
        partial[2u * slot] = m[r];
        partial[2u * slot + 1u] = l[r];
      }
    }
    workgroupBarrier();
    for (var r = 0u; r < R; r++) {
      let first_slot = r * GROUPS + g - split;
      var m_all = NO_SCORE;
      for (var s = 0u; s < SPLIT; s++) {
        m_all = max(m_all, partial[2u * (first_slot + s)]);
      }
      var l_all = 0.0;
      for (var s = 0u; s < SPLIT; s++) {
        let slot = first_slot + s;
        l_all += partial[2u * slot + 1u] * exp(partial[2u * slot] - m_all);
      }
      let factor = exp(m[r] - m_all);
      for (var c = 0u; c < VEC4S; c++) {
        o[r * MAX_VEC4S + c] *= factor;
      }
      m[r] = m_all;
      l[r] = l_all;
    }
    // ... and add up their o pairwise through the tile, one row of the groups at a time:
    // groups split + half pass theirs to groups split (one buffer row per receiver).
    for (var r = 0u; r < R; r++) {
      for (var half = SPLIT / 2u; half > 0u; half /= 2u) {
        let slot = (g / SPLIT) * half + split % half;
        if (split >= half && split < 2u * half) {
          for (var c = 0u; c < VEC4S; c++) {
            tile[slot * ROW_VEC4S + lane + c * LANES] = o[r * MAX_VEC4S + c];
          }
        }
        workgroupBarrier();
        if (split < half) {
          for (var c = 0u; c < VEC4S; c++) {
            o[r * MAX_VEC4S + c] += tile[slot * ROW_VEC4S + lane + c * LANES];
          }
        }
        workgroupBarrier();
      }
    }
  }
  if (split == 0u) {
    for (var r = 0u; r < R; r++) {
      if (writes[r]) {
        let out_base = p.out_off + row_off[r];
        let inv_l = 1.0 / l[r];
        if (SAVE_STATS == 1u && lane == 0u) {
          row_stats[p.stats_off + 2u * (row_off[r] / HEAD_DIM)] = m[r] + log(l[r]);
        }
        for (var c = 0u; c < VEC4S; c++) {
          let d = 4u * (lane + c * LANES);
          let value = o[r * MAX_VEC4S + c] * inv_l;
          for (var t = 0u; t < 4u; t++) {
            if (d + t < HEAD_DIM) {
              out[out_base + d + t] = value[t];
            }
          }
        }
      }
    }
  }
}
