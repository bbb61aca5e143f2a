// The register-blocked core shared by kernels/matmul_blocked.wgsl (forward) and
// matmul_backward_blocked.wgsl (prepended to both). A 256-thread workgroup computes a
// BM x BN output tile, each thread a TM x TN block of accumulators, so every value read
// from workgroup memory feeds TM or TN FMAs (a 16x16 tiled kernel does 1 FMA per 2
// workgroup reads). The reduction is walked in tiles of BK, each operand's tile loaded
// cooperatively by the kernel into a_tile (output rows) and b_tile (output columns).
//
// Tile sizes, measured on llvmpipe (8-wide SIMD, 2 cores) at 256x1024x512: 8x8 per thread
// (128x128 tiles) ran 1.5x faster than 4x4 (64x64); BK 32 did not beat 16. A real GPU
// wants much the same: 128x128 tiles with 8x8 per thread and 16 KiB of workgroup memory is
// the classic SGEMM shape (64 accumulators fit the register file; smaller problems would
// fill more SMs with 64x64 tiles, TM = TN = 4).

// Output rows per thread, 8 or 4: the host takes 4 (64-row tiles) for a few rows, where
// 128-row tiles would mostly multiply zeros.
override TM: u32 = 8u;
const MAX_TM: u32 = 8u;
const TN: u32 = 8u; // output columns per thread (a multiple of 4)
override BM: u32 = 16u * TM; // output rows per workgroup
const BN: u32 = 16u * TN; // output columns per workgroup
const BK: u32 = 16u; // reduction steps per tile
// Tiles are stored reduction-major as vec4s of 4 consecutive output rows / columns, so the
// inner loop reads TM / 4 vec4s of a and TN / 4 of b per step and does TM * TN FMAs.
var<workgroup> a_tile: array<array<vec4f, 16u * MAX_TM / 4u>, BK>; // [step][row / 4]
var<workgroup> b_tile: array<array<vec4f, BN / 4u>, BK>; // [step][col / 4]

// A run of 4 reduction-consecutive values (steps k .. k + 3) of output row r / column c,
// scattered into its tile: how an operand stored along the reduction is loaded.
fn store_a_run(k: u32, r: u32, v: vec4f) {
  for (var e = 0u; e < 4u; e++) {
    a_tile[k + e][r / 4u][r % 4u] = v[e];
  }
}
fn store_b_run(k: u32, c: u32, v: vec4f) {
  for (var e = 0u; e < 4u; e++) {
    b_tile[k + e][c / 4u][c % 4u] = v[e];
  }
}

// Thread (lid.x, lid.y) owns output rows TM lid.y .. + TM - 1 and columns
// TN lid.x .. + TN - 1 of the tile: acc[i * TN / 4 + j] holds row i, columns 4j .. 4j + 3.
// Only the first TM * TN / 4 entries of acc are used.
fn multiply_tiles(lid: vec3u, acc: ptr<function, array<vec4f, MAX_TM * TN / 4u>>) {
  for (var kk = 0u; kk < BK; kk++) {
    var b: array<vec4f, TN / 4u>;
    for (var j = 0u; j < TN / 4u; j++) {
      b[j] = b_tile[kk][lid.x * (TN / 4u) + j];
    }
    for (var i4 = 0u; i4 < TM / 4u; i4++) {
      let a = a_tile[kk][lid.y * (TM / 4u) + i4];
      for (var e = 0u; e < 4u; e++) {
        for (var j = 0u; j < TN / 4u; j++) {
          let idx = (i4 * 4u + e) * (TN / 4u) + j;
          (*acc)[idx] = fma(vec4f(a[e]), b[j], (*acc)[idx]);
        }
      }
    }
  }
}
