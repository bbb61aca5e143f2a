// The CPU backend's matmul where no BLAS library is found (or MOE_CONDENSE_BLAS=off): f32
// GEMM in WebAssembly SIMD (gemm.wat), with the Blas interface, so every op that calls BLAS
// has it. Blocks of A, B and C are copied into the module's memory, packed into panels there
// and multiplied tile by tile; the rows (or columns) of C are split over worker threads. Each
// entry of C sums its k products in the same order wherever it runs, so results are
// bit-identical for any thread count. Where relaxed SIMD is missing the kernel multiplies
// then adds (within float rounding of the FMA build).

import type { Blas } from "./blas.ts";
import type { RowThreads } from "./cpu_rows.ts";
import { GEMM_PLAIN_WASM_BASE64, GEMM_RELAXED_WASM_BASE64 } from "./gemm_wasm.ts";

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
// Below this many multiply-adds a product runs on one thread: a hand-over costs 0.1-0.3 ms.
const SPLIT_MACS = 1 << 22;

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
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const { exports } = new WebAssembly.Instance(new WebAssembly.Module(bytes));
    const memory = exports.memory as WebAssembly.Memory;
    let view = new Float32Array(memory.buffer);
    kernels = {
      heap(floats) {
        if (view.length < floats) {
          memory.grow(Math.ceil((floats * 4 - memory.buffer.byteLength) / 65536));
          view = new Float32Array(memory.buffer); // growing detaches the old view
        }
        return view;
      },
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
  /** Parts are blocks of NR columns of C, else of MR rows. */
  byColumns: boolean;
  /** gemm.wat's build: with relaxed-SIMD FMA, or multiply then add. */
  relaxed: boolean;
}

const roundUp = (x: number, to: number) => Math.ceil(x / to) * to;

/** How many parts gemmPart's range splits the product into. */
function partsOf(g: GemmArgs): number {
  return g.byColumns ? Math.ceil(g.n / NR) : Math.ceil(g.m / MR);
}

/**
 * Parts u0..u1 of a product (tiles of MR rows of C, or of NR columns with byColumns): the
 * row kernel the threads run. Its rows of op(A) and columns of op(B) are copied into the
 * module's memory, packed there, and C's block is copied in (beta != 0) and back.
 */
export function gemmPart(g: GemmArgs, u0: number, u1: number): void {
  const { transA, transB, k, alpha, a, lda, b, ldb, beta, c, ldc } = g;
  const i0 = g.byColumns ? 0 : u0 * MR, i1 = g.byColumns ? g.m : Math.min(g.m, u1 * MR);
  const j0 = g.byColumns ? u0 * NR : 0, j1 = g.byColumns ? Math.min(g.n, u1 * NR) : g.n;
  if (i1 <= i0 || j1 <= j0) return;
  if (k === 0) {
    for (let i = i0; i < i1; i++) {
      for (let j = j0; j < j1; j++) c[i * ldc + j] = beta === 0 ? 0 : beta * c[i * ldc + j];
    }
    return;
  }
  const wasm = loadGemm(g.relaxed);
  if (!wasm) throw new Error("the WebAssembly GEMM needs WebAssembly SIMD, which is missing here");
  if (g.m <= FEW_ROWS) return fewRows(wasm, g, j0, j1);
  // Columns of B packed at a time, all k of them.
  const ncMax = Math.max(NR, Math.floor(PACKED_B_FLOATS / k / NR) * NR);
  const nc0 = Math.min(ncMax, roundUp(j1 - j0, NR)), mc0 = Math.min(MC, roundUp(i1 - i0, MR));
  // Memory, in floats: the edge-tile scratch | op(B) raw | op(B) packed | op(A) raw (mc0
  // rows) | op(A) packed (one k block) | C's block.
  const tmp = 0, rawB = 64, packedB = rawB + k * nc0, rawA = packedB + k * nc0;
  const packedA = rawA + mc0 * k, cBlock = packedA + mc0 * KC;
  const heap = wasm.heap(cBlock + mc0 * nc0);
  for (let jc = j0; jc < j1; jc += nc0) {
    const nc = Math.min(nc0, j1 - jc), ncPadded = roundUp(nc, NR);
    // op(B)'s columns jc..jc+nc: entry (p, j) at rawB + p rsB + j csB
    let rsB, csB;
    if (transB) { // B is [n, k]: rows jc.. of it
      rsB = 1, csB = k;
      if (ldb === k) heap.set(b.subarray(jc * k, (jc + nc) * k), rawB);
      else {for (let j = 0; j < nc; j++) {
          heap.set(b.subarray((jc + j) * ldb, (jc + j) * ldb + k), rawB + j * k);
        }}
    } else { // B is [k, n]
      rsB = nc, csB = 1;
      for (let p = 0; p < k; p++) {
        heap.set(b.subarray(p * ldb + jc, p * ldb + jc + nc), rawB + p * nc);
      }
    }
    for (let pc = 0; pc < k; pc += KC) {
      const kc = Math.min(KC, k - pc);
      wasm.packB(4 * (rawB + pc * rsB), rsB, csB, kc, nc, 4 * (packedB + pc * ncPadded));
    }
    for (let ic = i0; ic < i1; ic += mc0) {
      const mc = Math.min(mc0, i1 - ic);
      let rsA, csA;
      if (transA) { // A is [k, m]: columns ic.. of it
        rsA = 1, csA = mc;
        for (let p = 0; p < k; p++) {
          heap.set(a.subarray(p * lda + ic, p * lda + ic + mc), rawA + p * mc);
        }
      } else {
        rsA = k, csA = 1;
        if (lda === k) heap.set(a.subarray(ic * k, (ic + mc) * k), rawA);
        else {for (let i = 0; i < mc; i++) {
            heap.set(a.subarray((ic + i) * lda, (ic + i) * lda + k), rawA + i * k);
          }}
      }
      if (beta !== 0) {
        for (let i = 0; i < mc; i++) {
          const row = c.subarray((ic + i) * ldc + jc, (ic + i) * ldc + jc + nc);
          heap.set(row, cBlock + i * nc);
        }
        if (beta !== 1) { for (let x = cBlock; x < cBlock + mc * nc; x++) heap[x] *= beta; }
      }
      for (let pc = 0; pc < k; pc += KC) {
        const kc = Math.min(KC, k - pc);
        wasm.packA(4 * (rawA + pc * csA), rsA, csA, mc, kc, 4 * packedA);
        const overwrite = beta === 0 && pc === 0 ? 1 : 0;
        wasm.tiles(
          4 * packedA,
          4 * (packedB + pc * ncPadded),
          4 * cBlock,
          nc,
          mc,
          nc,
          kc,
          alpha,
          overwrite,
          4 * tmp,
        );
      }
      for (let i = 0; i < mc; i++) {
        c.set(heap.subarray(cBlock + i * nc, cBlock + (i + 1) * nc), (ic + i) * ldc + jc);
      }
    }
  }
}

/**
 * Columns j0..j1 of a product of at most FEW_ROWS rows, without packing: dots (B transposed)
 * or row_sums (B as is), on rows padded with zeros to whole vectors.
 */
function fewRows(wasm: GemmKernels, g: GemmArgs, j0: number, j1: number): void {
  const { transA, transB, m, k, alpha, a, lda, b, ldb, beta, c, ldc } = g;
  const k4 = roundUp(k, 4);
  // Columns of B at a time (at most PACKED_B_FLOATS of B's floats).
  const nc0 = Math.min(roundUp(j1 - j0, 4), Math.max(4, Math.floor(PACKED_B_FLOATS / k4 / 4) * 4));
  // Memory, in floats: op(A) [m, k4] | B's block | C's block [m, nc0] | row_sums' sums [nc0]
  const rawA = 0, rawB = m * k4, cBlock = rawB + k4 * nc0, acc = cBlock + m * nc0;
  const heap = wasm.heap(acc + nc0);
  heap.fill(0, rawA, rawB);
  for (let i = 0; i < m; i++) {
    if (!transA) heap.set(a.subarray(i * lda, i * lda + k), rawA + i * k4);
    else for (let p = 0; p < k; p++) heap[rawA + i * k4 + p] = a[p * lda + i];
  }
  for (let jc = j0; jc < j1; jc += nc0) {
    const nc = Math.min(nc0, j1 - jc), nc4 = roundUp(nc, 4);
    heap.fill(0, rawB, rawB + k4 * nc4);
    if (transB) { // B is [n, k]: nc4 rows of k4 (zeros past k and nc)
      for (let j = 0; j < nc; j++) {
        heap.set(b.subarray((jc + j) * ldb, (jc + j) * ldb + k), rawB + j * k4);
      }
    } else { // B is [k, n]: k4 rows of nc4 (zeros past k and nc)
      for (let p = 0; p < k; p++) {
        heap.set(b.subarray(p * ldb + jc, p * ldb + jc + nc), rawB + p * nc4);
      }
    }
    if (beta !== 0) {
      for (let i = 0; i < m; i++) {
        heap.set(c.subarray(i * ldc + jc, i * ldc + jc + nc), cBlock + i * nc);
      }
      if (beta !== 1) { for (let x = cBlock; x < cBlock + m * nc; x++) heap[x] *= beta; }
    }
    const overwrite = beta === 0 ? 1 : 0;
    if (transB) wasm.dots(4 * rawA, 4 * rawB, 4 * cBlock, nc, m, nc, k4, alpha, overwrite);
    else {wasm.rowSums(
        4 * rawA,
        4 * rawB,
        4 * cBlock,
        nc,
        m,
        nc,
        nc4,
        k4,
        alpha,
        overwrite,
        4 * acc,
      );}
    for (let i = 0; i < m; i++) {
      c.set(heap.subarray(cBlock + i * nc, cBlock + (i + 1) * nc), i * ldc + jc);
    }
  }
}

let sharedScratch: Float32Array | null = null;

/**
 * A Blas whose sgemm is gemm.wat, split over `pool`'s threads when big enough (C and the
 * inputs then go to the workers in shared memory: RowThreads.run shares a copy of an input
 * that is not, and C is computed in a shared scratch if it is not).
 */
export function wasmBlas(pool: RowThreads, relaxed = hasRelaxedSimd()): Blas {
  const sgemm: Blas["sgemm"] = (transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) => {
    if (m === 0 || n === 0) return;
    // The dimension split is the one whose other operand is the smaller copy per thread.
    const g: GemmArgs = {
      transA,
      transB,
      m,
      n,
      k,
      alpha,
      a,
      lda,
      b,
      ldb,
      beta,
      c,
      ldc,
      byColumns: m < n,
      relaxed,
    };
    const parts = partsOf(g);
    if (pool.threads < 2 || parts < 2 || m * n * k < SPLIT_MACS) return gemmPart(g, 0, parts);
    if (c.buffer instanceof SharedArrayBuffer) {
      return pool.run("gemm", g, parts, Math.ceil((m * n * k) / parts), [c]);
    }
    if (!sharedScratch || sharedScratch.length < m * n) {
      sharedScratch = new Float32Array(new SharedArrayBuffer(4 * m * n));
    }
    const scratch = sharedScratch.subarray(0, m * n);
    if (beta !== 0) {
      for (let i = 0; i < m; i++) scratch.set(c.subarray(i * ldc, i * ldc + n), i * n);
    }
    pool.run("gemm", { ...g, c: scratch, ldc: n }, parts, Math.ceil((m * n * k) / parts), [
      scratch,
    ]);
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
