// Shared by the tiled attention kernels, attention_tiled.wgsl and
// attention_backward_tiled.wgsl (the host prepends it; attentionTiling and
// attentionBackwardTiling in lib/backend/webgpu/attention.ts size their tiles from the same
// numbers): the thread layout and the loads of a head row's vec4s.

// Pipeline constants, so the per-thread loops have fixed trip counts (unrolled: llvmpipe
// ends a thread's loops after 65,535 iterations, and unrolled ones do not count) and the
// rows stay in registers.
override HEAD_DIM: u32 = 64u;

// Threads per group: 4, or 8 past head_dim 128, so that a thread holds at most
// MAX_VEC4S vec4s of a row. With 16, llvmpipe kept the loops over them (forward: head_dim
// 256 wrong from 2,048 keys; backward: wrong from 1,024 keys with 4 lanes, right at 6,144
// with 8); a GPU would spill the registers.
override LANES: u32 = 4u;

const THREADS: u32 = 64u;
const R: u32 = 2u; // rows per group
const MAX_VEC4S: u32 = 8u; // vec4s of a row per thread, at most

override GROUPS: u32 = THREADS / LANES;
override ROWS: u32 = GROUPS * R; // rows per workgroup

override VEC4S: u32 = (HEAD_DIM + 4u * LANES - 1u) / (4u * LANES); // of a row per thread
override ROW_VEC4S: u32 = VEC4S * LANES; // a padded row

const NO_SCORE: f32 = -3.4e38;

// Dimensions d .. d + 3 of the head row at `base` (zero past HEAD_DIM), from q, k or v.
// (WGSL cannot pass a storage buffer to a function, so each buffer has its own.)
fn q4(base: u32, d: u32) -> vec4f {
  var r = vec4f(0.0);
  for (var c = 0u; c < 4u; c++) {
    if (d + c < HEAD_DIM) {
      r[c] = q[base + d + c];
    }
  }
  return r;
}

fn k4(base: u32, d: u32) -> vec4f {
  var r = vec4f(0.0);
  for (var c = 0u; c < 4u; c++) {
    if (d + c < HEAD_DIM) {
      r[c] = k[base + d + c];
    }
  }
  return r;
}

fn v4(base: u32, d: u32) -> vec4f {
  var r = vec4f(0.0);
  for (var c = 0u; c < 4u; c++) {
    if (d + c < HEAD_DIM) {
      r[c] = v[base + d + c];
    }
  }
  return r;
}
