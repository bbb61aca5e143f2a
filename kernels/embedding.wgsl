// out[i, c] = table[ids[i], c] for the ids that fall in this row chunk of the table
// [chunk_rows, cols]; the host runs one dispatch per chunk so every id is served once.

struct Params {
  count: u32, // ids in this dispatch
  cols: u32,
  row0: u32, // first table row held by this chunk
  chunk_rows: u32,
  first_id: u32, // ids[first_id] is this dispatch's first id
  out_off: u32, // out is bound from an aligned offset; this skips to the first id's row
}

override W_DTYPE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<i32>; // all ids
@group(0) @binding(2) var<storage, read> table: array<u32>; // [chunk_rows, cols] in W_DTYPE
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // [count, cols]

@compute @workgroup_size(64)
fn embedding(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
             @builtin(local_invocation_id) lid: vec3u) {
  let t = (wg.y * nwg.x + wg.x) * 64u + lid.x;
  if (t >= p.count * p.cols) {
    return;
  }
  let i = t / p.cols;
  let c = t % p.cols;
  let id = u32(ids[p.first_id + i]); // validated on the host: 0 <= id < vocab
  if (id < p.row0 || id >= p.row0 + p.chunk_rows) {
    return;
  }
  let e = (id - p.row0) * p.cols + c;
  out[p.out_off + t] = decode(table[word_index(e, W_DTYPE)], e, W_DTYPE);
}
