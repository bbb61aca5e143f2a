// The CPU backend's matmul where no BLAS library is found (or MOE_CONDENSE_BLAS=off): f32
// GEMM in WebAssembly SIMD (gemm.wat), with the Blas interface, so every op that calls BLAS
// has it. Blocks of A, B and C are copied into the module's memory, packed into panels there
// and multiplied tile by tile; the rows (or columns) of C are split over worker threads. Each
// entry of C sums its k products in the same order wherever it runs, so results are
// bit-identical for any thread count. Where relaxed SIMD is missing the kernel multiplies
// then adds (within float rounding of the FMA build).

import type { Blas } from "./blas.ts";
import { GEMM_PLAIN_WASM_BASE64, GEMM_RELAXED_WASM_BASE64 } from "./gemm_wasm.ts";
import { instantiateWasm } from "./wasm_module.ts";

// gemm.wat's tile: 6 rows of A by 8 columns of B.
const MR = 6, NR = 8;
// Blocking: k runs in blocks of KC (an A panel, 6 KC floats, and a B panel, 8 KC floats, stay
// in L1), A in blocks of MC rows (MC x KC floats, 96 KiB, in L2), and B's packed columns take
// at most PACKED_B_FLOATS (4 MiB) at a time.
const KC = 256, MC = 96, PACKED_B_FLOATS = 1 << 20;
// A product of at most this many rows skips packing (fewRows).
// One row, 1024 x 1024: 3.7 against 2.0 GFLOP/s packed with B transposed, 4.2 against 0.9
// with B as is; from 4 to 16 rows about even.
const FEW_ROWS = 4;
// Below this many multiply-adds (about 1 ms on one thread) a product runs on one thread: a
// hand-over costs 0.1-0.3 ms. Attention's per-head products (256 x 256 x 64 in the search)
// stay whole.
const SPLIT_MACS = 1 << 24;

const RELAXED_PROBE = Uint8Array.of(
  // (module (func (param v128 v128 v128) (result v128)
  //   (f32x4.relaxed_madd (local.get 0) (local.get 1) (local.get 2))))
  ...[0, 97, 115, 109, 1, 0, 0, 0, 1, 8, 1, 96, 3, 123, 123, 123, 1, 123, 3, 2, 1, 0],
  ...[10, 13, 1, 11, 0, 32, 0, 32, 1, 32, 2, 253, 133, 2, 11],
);

/** Whether this runtime has relaxed SIMD (the FMA build of the kernel). */
export function hasRelaxedSimd(): boolean {
  return WebAssembly.validate(RELAXED_PROBE);
}

interface GemmKernels {
  /** The module's memory as f32, at least `floats` long. */
  heap(floats: number): Float32Array;
  packA(src: number, rs: number, cs: number, mc: number, kc: number, dst: number): void;
  packB(src: number, rs: number, cs: number, kc: number, nc: number, dst: number): void;
  dots(
    a: number,
    b: number,
    c: number,
    ldc: number,
    m: number,
    n: number,
    k4: number,
    alpha: number,
    overwrite: number,
  ): void;
  rowSums(
    a: number,
    b: number,
    c: number,
    ldc: number,
    m: number,
    n: number,
    n4: number,
    k4: number,
    alpha: number,
    overwrite: number,
    acc: number,
  ): void;
  tiles(
    pa: number,
    pb: number,
    c: number,
    ldc: number,
    mc: number,
    nc: number,
    kc: number,
    alpha: number,
    overwrite: number,
    tmp: number,
  ): void;
}

const instances = new Map<boolean, GemmKernels | null>();

/**
 * gemm.wat on this thread (each worker has its own instance), or null without SIMD.
 * relaxed: the build with relaxed-SIMD FMA (where the runtime has it), else the plain one.
 */
export function loadGemm(relaxed = hasRelaxedSimd()): GemmKernels | null {
  if (instances.has(relaxed)) return instances.get(relaxed)!;
  let kernels: GemmKernels | null;
  try {
    const base64 = relaxed ? GEMM_RELAXED_WASM_BASE64 : GEMM_PLAIN_WASM_BASE64;
    const { exports, heap } = instantiateWasm(base64);
    kernels = {
      heap,
      packA: exports.pack_a as GemmKernels["packA"],
      packB: exports.pack_b as GemmKernels["packB"],
      tiles: exports.tiles as GemmKernels["tiles"],
      dots: exports.dots as GemmKernels["dots"],
      rowSums: exports.row_sums as GemmKernels["rowSums"],
    };
  } catch {
    kernels = null; // no WebAssembly SIMD (or no relaxed SIMD, for that build)
  }
  instances.set(relaxed, kernels);
  return kernels;
}

/** A product for gemmPart: row-major C = alpha op(A) op(B) + beta C, as cblas_sgemm. */
export interface GemmArgs {
  transA: boolean;
  transB: boolean;
  m: number;
  n: number;
  k: number;
  alpha: number;
  a: Float32Array;
  lda: number;
  b: Float32Array;
  ldb: number;
  beta: number;
  c: Float32Array;
  ldc: number;
  /** gemm.wat's build: with relaxed-SIMD FMA, or multiply then add. */
  relaxed: boolean;
  /**
   * The work in chunks: each `nc0` columns of C (all k of B's columns packed at once) by `mc0`
   * rows (or all of them, with wholeColumns), numbered column block by column block.
   */
  chunks: number;
  nc0: number;
  mc0: number;
  /** A chunk is a block of columns with all of C's rows (wide products, and few rows). */
  wholeColumns: boolean;
  /** With threads: the next chunk to take, counted up by whoever takes one. */
  next: Int32Array | null;
}

const roundUp = (x: number, to: number) => Math.ceil(x / to) * to;

/**
 * How a product splits into chunks for `threads` threads. Most go by blocks of rows: each
 * thread packs B's column block once and takes row blocks until none are left. A wide one
 * (4 m < n) goes by blocks of columns (about 4 a thread, for balance), rows whole, where A,
 * which each chunk then copies and packs again, costs less than B would per thread.
 */
function chunking(
  m: number,
  n: number,
  k: number,
  threads: number,
): Pick<GemmArgs, "chunks" | "nc0" | "mc0" | "wholeColumns"> {
  const lane = m <= FEW_ROWS ? 4 : NR; // fewRows works on 4 columns at a time
  // At most PACKED_B_FLOATS of B's floats at a time, all k of each column.
  const ncMax = Math.max(lane, Math.floor(PACKED_B_FLOATS / Math.max(k, 1) / lane) * lane);
  if (4 * m < n || m <= FEW_ROWS) {
    const nc0 = Math.min(ncMax, roundUp(Math.ceil(n / (threads > 1 ? 4 * threads : 1)), lane));
    return { chunks: Math.ceil(n / nc0), nc0, mc0: Math.min(MC, m), wholeColumns: true };
  }
  // Row blocks of MC, smaller where that leaves fewer than 4 a thread (but at least 24 rows).
  const rows = threads > 1 ? Math.max(4 * MR, Math.ceil(m / (4 * threads))) : m;
  const nc0 = Math.min(ncMax, roundUp(n, NR)), mc0 = Math.min(MC, roundUp(rows, MR));
  return { chunks: Math.ceil(n / nc0) * Math.ceil(m / mc0), nc0, mc0, wholeColumns: false };
}

/**
 * The row kernel the threads run: chunks u0..u1 of a product (see chunking), or with
 * `g.next`, chunks taken one at a time until none are left, so a thread slowed by other
 * work on its core takes fewer. op(A)'s rows and op(B)'s columns are copied into the
 * module's memory and packed there, and C's block is copied in (beta != 0) and back.
 */
export function gemmPart(g: GemmArgs, u0: number, u1: number): void {
  const wasm = loadGemm(g.relaxed);
  if (!wasm) throw new Error("the WebAssembly GEMM needs WebAssembly SIMD, which is missing here");
  const run = g.m <= FEW_ROWS ? fewRows(wasm, g) : packed(wasm, g);
  if (!g.next) {
    for (let q = u0; q < u1; q++) run(q);
    return;
  }
  for (let q; (q = Atomics.add(g.next, 0, 1)) < g.chunks;) run(q);
}

/** Chunk q's columns [j0, j1) and rows [i0, i1). */
function chunkAt(g: GemmArgs, q: number) {
  const rowBlocks = g.wholeColumns ? 1 : Math.ceil(g.m / g.mc0);
  const j0 = Math.floor(q / rowBlocks) * g.nc0, i0 = g.wholeColumns ? 0 : (q % rowBlocks) * g.mc0;
  return {
    i0,
    i1: g.wholeColumns ? g.m : Math.min(g.m, i0 + g.mc0),
    j0,
    j1: Math.min(g.n, j0 + g.nc0),
  };
}

/** C[i, j] = beta C[i, j] over a block: the product when k = 0. */
function scaleBlock(g: GemmArgs, i0: number, i1: number, j0: number, j1: number): void {
  for (let i = i0; i < i1; i++) {
    for (let j = j0; j < j1; j++) {
      g.c[i * g.ldc + j] = g.beta === 0 ? 0 : g.beta * g.c[i * g.ldc + j];
    }
  }
}

/** Copies C's block [i0, i0 + rows) x [j0, j0 + cols) to `at` in the heap, times beta. */
function loadC(
  heap: Float32Array,
  at: number,
  g: GemmArgs,
  i0: number,
  rows: number,
  j0: number,
  cols: number,
) {
  for (let i = 0; i < rows; i++) {
    heap.set(g.c.subarray((i0 + i) * g.ldc + j0, (i0 + i) * g.ldc + j0 + cols), at + i * cols);
  }
  if (g.beta !== 1) { for (let x = at; x < at + rows * cols; x++) heap[x] *= g.beta; }
}

/** Copies the heap's block at `at` back to C's [i0, i0 + rows) x [j0, j0 + cols). */
function storeC(
  heap: Float32Array,
  at: number,
  g: GemmArgs,
  i0: number,
  rows: number,
  j0: number,
  cols: number,
) {
  for (let i = 0; i < rows; i++) {
    g.c.set(heap.subarray(at + i * cols, at + (i + 1) * cols), (i0 + i) * g.ldc + j0);
  }
}

/** The packed path's chunk runner: B's column block packed once per thread, then tiles. */
function packed(wasm: GemmKernels, g: GemmArgs): (q: number) => void {
  const { transA, transB, k, alpha, a, lda, b, ldb, beta, nc0, mc0 } = g;
  // Memory, in floats: the edge-tile scratch | op(B) raw | op(B) packed | op(A) raw (mc0
  // rows) | op(A) packed (one k block) | C's block.
  const tmp = 0, rawB = 64, packedB = rawB + k * nc0, rawA = packedB + k * roundUp(nc0, NR);
  const packedA = rawA + mc0 * k, cBlock = packedA + roundUp(mc0, MR) * KC;
  const heap = wasm.heap(cBlock + mc0 * nc0);
  let packedFor = -1; // the first column of the block of B packed now
  return (q) => {
    const { i0, i1, j0, j1 } = chunkAt(g, q);
    if (k === 0) return scaleBlock(g, i0, i1, j0, j1);
    const nc = j1 - j0, ncPadded = roundUp(nc, NR);
    if (packedFor !== j0) {
      packedFor = j0;
      // op(B)'s columns j0..j1: entry (p, j) at rawB + p rsB + j csB
      const rsB = transB ? 1 : nc, csB = transB ? k : 1;
      if (transB && ldb === k) heap.set(b.subarray(j0 * k, j1 * k), rawB); // B is [n, k]
      else if (transB) {
        for (let j = 0; j < nc; j++) {
          heap.set(b.subarray((j0 + j) * ldb, (j0 + j) * ldb + k), rawB + j * k);
        }
      } else { // B is [k, n]
        for (let p = 0; p < k; p++) heap.set(b.subarray(p * ldb + j0, p * ldb + j1), rawB + p * nc);
      }
      for (let pc = 0; pc < k; pc += KC) {
        const kc = Math.min(KC, k - pc);
        wasm.packB(4 * (rawB + pc * rsB), rsB, csB, kc, nc, 4 * (packedB + pc * ncPadded));
      }
    }
    for (let ic = i0; ic < i1; ic += mc0) {
      const mc = Math.min(mc0, i1 - ic);
      // op(A)'s rows ic..ic+mc: entry (i, p) at rawA + i rsA + p csA
      const rsA = transA ? 1 : k, csA = transA ? mc : 1;
      if (transA) { // A is [k, m]
        for (let p = 0; p < k; p++) {
          heap.set(a.subarray(p * lda + ic, p * lda + ic + mc), rawA + p * mc);
        }
      } else if (lda === k) heap.set(a.subarray(ic * k, (ic + mc) * k), rawA);
      else {
        for (let i = 0; i < mc; i++) {
          heap.set(a.subarray((ic + i) * lda, (ic + i) * lda + k), rawA + i * k);
        }
      }
      if (beta !== 0) loadC(heap, cBlock, g, ic, mc, j0, nc);
      for (let pc = 0; pc < k; pc += KC) {
        const kc = Math.min(KC, k - pc), overwrite = beta === 0 && pc === 0 ? 1 : 0;
        wasm.packA(4 * (rawA + pc * csA), rsA, csA, mc, kc, 4 * packedA);
        const pb = 4 * (packedB + pc * ncPadded);
        wasm.tiles(4 * packedA, pb, 4 * cBlock, nc, mc, nc, kc, alpha, overwrite, 4 * tmp);
      }
      storeC(heap, cBlock, g, ic, mc, j0, nc);
    }
  };
}

/**
 * The chunk runner for products of at most FEW_ROWS rows, without packing: dots (B
 * transposed) or row_sums (B as is), on rows padded with zeros to whole vectors.
 */
function fewRows(wasm: GemmKernels, g: GemmArgs): (q: number) => void {
  const { transA, transB, m, k, alpha, a, lda, b, ldb, beta, nc0 } = g;
  const k4 = roundUp(k, 4);
  // Memory, in floats: op(A) [m, k4] | B's block | C's block [m, nc0] | row_sums' sums [nc0]
  const rawA = 0, rawB = m * k4, cBlock = rawB + k4 * roundUp(nc0, 4), acc = cBlock + m * nc0;
  const heap = wasm.heap(acc + roundUp(nc0, 4));
  heap.fill(0, rawA, rawB);
  for (let i = 0; i < m; i++) {
    if (!transA) heap.set(a.subarray(i * lda, i * lda + k), rawA + i * k4);
    else for (let p = 0; p < k; p++) heap[rawA + i * k4 + p] = a[p * lda + i];
  }
  return (q) => {
    const { j0, j1 } = chunkAt(g, q);
    if (k === 0) return scaleBlock(g, 0, m, j0, j1);
    const nc = j1 - j0, nc4 = roundUp(nc, 4);
    heap.fill(0, rawB, rawB + k4 * nc4);
    if (transB) { // B is [n, k]: nc4 rows of k4 (zeros past k and nc)
      for (let j = 0; j < nc; j++) {
        heap.set(b.subarray((j0 + j) * ldb, (j0 + j) * ldb + k), rawB + j * k4);
      }
    } else { // B is [k, n]: k4 rows of nc4 (zeros past k and nc)
      for (let p = 0; p < k; p++) heap.set(b.subarray(p * ldb + j0, p * ldb + j1), rawB + p * nc4);
    }
    if (beta !== 0) loadC(heap, cBlock, g, 0, m, j0, nc);
    const overwrite = beta === 0 ? 1 : 0;
    if (transB) wasm.dots(4 * rawA, 4 * rawB, 4 * cBlock, nc, m, nc, k4, alpha, overwrite);
    else {
      const sums = [4 * rawA, 4 * rawB, 4 * cBlock, nc, m, nc, nc4, k4] as const;
      wasm.rowSums(...sums, alpha, overwrite, 4 * acc);
    }
    storeC(heap, cBlock, g, 0, m, j0, nc);
  };
}

/**
 * What wasmBlas needs of cpu_rows.ts's RowThreads, stated here: cpu_rows.ts runs gemmPart on
 * its workers, so importing its type would make the two files import each other.
 */
interface GemmThreads {
  readonly threads: number;
  run(
    kernel: "gemm",
    args: GemmArgs,
    rows: number,
    rowElements: number,
    writes: Float32Array[],
  ): void;
}

let sharedScratch: Float32Array | null = null;
let nextChunk: Int32Array | null = null;

/**
 * A Blas whose sgemm is gemm.wat, split over `pool`'s threads when big enough (C and the
 * inputs then go to the workers in shared memory: RowThreads.run shares a copy of an input
 * that is not, and C is computed in a shared scratch if it is not). `onFirstUse` is called
 * at the first product.
 */
export function wasmBlas(
  pool: GemmThreads,
  relaxed = hasRelaxedSimd(),
  onFirstUse?: () => void,
): Blas {
  const sgemm: Blas["sgemm"] = (transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) => {
    onFirstUse?.(), onFirstUse = undefined;
    if (m === 0 || n === 0) return;
    const threads = m * n * k < SPLIT_MACS ? 1 : pool.threads;
    const g: GemmArgs = {
      ...{ transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, relaxed },
      ...chunking(m, n, k, threads),
      next: null,
    };
    if (threads < 2 || g.chunks < 2) return gemmPart(g, 0, g.chunks);
    nextChunk ??= new Int32Array(new SharedArrayBuffer(4));
    nextChunk[0] = 0;
    // One job a thread; each takes chunks from `next` until none are left.
    const work = Math.ceil((m * n * k) / pool.threads);
    if (c.buffer instanceof SharedArrayBuffer) {
      return pool.run("gemm", { ...g, next: nextChunk }, pool.threads, work, [c]);
    }
    // C is computed in a shared scratch, kept for the next product up to 16 MiB (a fresh
    // array's pages fault in on first write).
    let scratch = sharedScratch?.subarray(0, m * n);
    if (!scratch || scratch.length < m * n) {
      scratch = new Float32Array(new SharedArrayBuffer(4 * m * n));
      if (m * n <= 1 << 22) sharedScratch = scratch;
    }
    if (beta !== 0) {
      for (let i = 0; i < m; i++) scratch.set(c.subarray(i * ldc, i * ldc + n), i * n);
    }
    pool.run("gemm", { ...g, c: scratch, ldc: n, next: nextChunk }, pool.threads, work, [scratch]);
    for (let i = 0; i < m; i++) c.set(scratch.subarray(i * n, (i + 1) * n), i * ldc);
  };
  return {
    library: `WebAssembly SIMD (${relaxed ? "relaxed FMA" : "multiply-add"}` +
      (pool.threads > 1 ? `, ${pool.threads} threads)` : ")"),
    kernels: null,
    sgemm,
    matmulTransB: (x, w, y, n, k, m) => sgemm(false, true, n, m, k, 1, x, k, w, k, 0, y, m),
  };
}
