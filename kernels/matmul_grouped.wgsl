// The tile table of the grouped matmuls (prepended after the forward or backward common
// file, whose Params carry first_group .. tile_rows and whose `starts` binding holds the
// group starts): kernels/matmul_blocked.wgsl and matmul_gemv.wgsl (groupedMatmul) and
// matmul_backward_blocked.wgsl's input_grad (groupedMatmulBackward).

// One workgroup's share of a grouped matmul: rows row0 .. row0 + rows of the bound x (0
// rows: no tile, the workgroup returns), the matrix starting at weight element w_base and
// its rows col0 .. col0 + cols in this weight chunk (the forward's output columns, the
// input gradient's reduction range).
struct Tile {
  w_base: u32,
  row0: u32,
  rows: u32,
  col0: u32,
  cols: u32,
}

var<workgroup> workgroup_tile: Tile;

// Tile `index` of the dispatch, found by thread t == 0 and shared with the workgroup (one
// walk per workgroup: 256 threads walking the groups cost llvmpipe a fifth of a decode
// step). No table has to be built by a dispatch of its own.
fn grouped_tile(index: u32, t: u32) -> Tile {
  if (t == 0u) {
    workgroup_tile = find_tile(index);
  }
  return workgroupUniformLoad(&workgroup_tile);
}

// The groups' bound rows cut into tiles of tile_rows, group by group; tile `index` of them
// (a few hundred groups at most).
fn find_tile(index: u32) -> Tile {
  var n = 0u;
  for (var g = p.first_group; g < p.end_group; g++) {
    let a = max(starts[g], p.r0);
    let b = min(starts[g + 1u], p.r0 + p.rows);
    if (b <= a) {
      continue;
    }
    let count = (b - a + p.tile_rows - 1u) / p.tile_rows;
    if (index < n + count) {
      let s = a + (index - n) * p.tile_rows;
      // The part of expert g's matrix rows inside this weight chunk.
      let g_row0 = g * p.m;
      let c0 = select(0u, p.chunk_row0 - g_row0, p.chunk_row0 > g_row0);
      let c1 = min(p.chunk_row0 + p.chunk_rows - g_row0, p.m);
      return Tile((g_row0 + c0 - p.chunk_row0) * p.k, s - p.r0, min(p.tile_rows, b - s), c0, c1 - c0);
    }
    n += count;
  }
  return Tile(0u, 0u, 0u, 0u, 0u);
}
