// Optional BLAS sgemm (and sgemv for a few rows) through Deno's FFI: OpenBLAS on Linux (Debian: libopenblas0),
// Accelerate on macOS. The CPU backend uses it for matmul when present and falls back
// to its plain loops otherwise; tests check one against the other.

const CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112;

const CANDIDATES: Record<string, string[]> = {
  linux: ["libopenblas.so.0", "libopenblas.so", "libblis.so.4", "libblas.so.3"],
  darwin: ["/System/Library/Frameworks/Accelerate.framework/Accelerate", "libopenblas.dylib"],
  windows: ["libopenblas.dll"],
};

// cblas arguments: enums and sizes (i32), scalars (f32), arrays each with its stride.
const I = "i32", F = "f32", ARRAY = ["buffer", "i32"] as const;
const SYMBOLS = {
  cblas_sgemm: {
    parameters: [I, I, I, I, I, I, F, ...ARRAY, ...ARRAY, F, ...ARRAY],
    result: "void",
  },
  cblas_sgemv: { // for products of a few rows; sgemm alone is enough
    parameters: [I, I, I, I, F, ...ARRAY, ...ARRAY, F, ...ARRAY],
    result: "void",
    optional: true,
  },
} as const;

// A product with at most this many rows of output runs sgemv once per row. OpenBLAS's
// sgemm is slow for a few rows: with one row sgemv took 0.17-0.21x sgemm's time, with 8 rows
// 0.61-0.74x, and they tie near 12 (K x M 256 x 768 and 2048 x 1408, on this project's
// 2-core machine). Decoding is one row per matmul and per attention head.
const GEMV_MAX_ROWS = 8;

export interface Blas {
  library: string;
  /** Row-major C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C, with leading dimensions. */
  sgemm(
    transA: boolean,
    transB: boolean,
    m: number,
    n: number,
    k: number,
    alpha: number,
    a: Float32Array,
    lda: number,
    b: Float32Array,
    ldb: number,
    beta: number,
    c: Float32Array,
    ldc: number,
  ): void;
  /** y[n, m] = x[n, k] @ w[m, k]^T */
  matmulTransB(
    x: Float32Array,
    w: Float32Array,
    y: Float32Array,
    n: number,
    k: number,
    m: number,
  ): void;
}

let cached: Blas | null | undefined;

/** Load the first BLAS library found, or null. `MOE_CONDENSE_BLAS=off` disables it. */
export function loadBlas(): Blas | null {
  if (cached !== undefined) return cached;
  cached = null;
  if (Deno.env.get("MOE_CONDENSE_BLAS") === "off") return cached;
  const names = Deno.env.get("MOE_CONDENSE_BLAS")?.split(",") ?? CANDIDATES[Deno.build.os] ?? [];
  for (const library of names) {
    try {
      const lib = Deno.dlopen(library, SYMBOLS);
      const op = (t: boolean) => (t ? CblasTrans : CblasNoTrans);
      const sgemv = lib.symbols.cblas_sgemv;
      const sgemm: Blas["sgemm"] = (
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
      ) => {
        if (sgemv && m <= GEMV_MAX_ROWS) {
          // Row i of C = op(B)^T times row i of op(A) (a column of A when transposed).
          for (let i = 0; i < m; i++) {
            const x = transA ? a.subarray(i) : a.subarray(i * lda), incx = transA ? lda : 1;
            const y = c.subarray(i * ldc);
            if (transB) {
              sgemv(CblasRowMajor, CblasNoTrans, n, k, alpha, b, ldb, x, incx, beta, y, 1);
            } else sgemv(CblasRowMajor, CblasTrans, k, n, alpha, b, ldb, x, incx, beta, y, 1);
          }
          return;
        }
        lib.symbols.cblas_sgemm(
          CblasRowMajor,
          op(transA),
          op(transB),
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
        );
      };
      cached = {
        library,
        sgemm,
        matmulTransB: (x, w, y, n, k, m) => sgemm(false, true, n, m, k, 1, x, k, w, k, 0, y, m),
      };
      break;
    } catch {
      // not installed under this name: try the next
    }
  }
  return cached;
}
