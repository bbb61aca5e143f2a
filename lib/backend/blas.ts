// Optional BLAS sgemm (and sgemv for a few rows) through Deno's FFI: OpenBLAS on Linux (Debian: libopenblas0),
// Accelerate on macOS. The CPU backend uses it for matmul when present and falls back
// to its WebAssembly GEMM otherwise (wasm_gemm.ts); tests check both against the plain loops.

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
  openblas_get_corename: { parameters: [], result: "pointer", optional: true },
} as const;

// OpenBLAS picks its kernels by the CPU's model number. Under a hypervisor that reports a
// model it does not know (seen: "Intel(R) Xeon(R) Processor" with AVX-512, 2 cores) it
// falls back to these SSE-era kernels: sgemm ran 28 GFLOP/s there instead of SkylakeX's
// 154, and the default model's forward at half the reference's speed.
export const OPENBLAS_FALLBACK_CORES = ["Prescott", "Core2", "Penryn", "Dunnington", "Nehalem"];

// A product with at most this many rows of output runs sgemv once per row. OpenBLAS's
// sgemm is slow for a few rows: with one row sgemv took 0.17-0.21x sgemm's time, with 8 rows
// 0.61-0.74x, and they tie near 12 (K x M 256 x 768 and 2048 x 1408, on this project's
// 2-core machine). Decoding is one row per matmul and per attention head.
const GEMV_MAX_ROWS = 8;

export interface Blas {
  library: string;
  /** OpenBLAS's kernel set ("SkylakeX", "Haswell", ...), where the library says. */
  kernels: string | null;
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
      const lib = openWithKernels(library);
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
      const corename = lib.symbols.openblas_get_corename?.();
      cached = {
        library,
        kernels: corename ? Deno.UnsafePointerView.getCString(corename) : null,
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

/**
 * The line a job prints when its work starts (its first product) if matmul runs without
 * BLAS (in WebAssembly SIMD, wasm_gemm.ts), naming what makes it faster; null with BLAS.
 */
export function noBlasNotice(): string | null {
  if (loadBlas()) return null;
  if (Deno.env.get("MOE_CONDENSE_BLAS") === "off") {
    return "matmul: WebAssembly SIMD, as MOE_CONDENSE_BLAS=off asks (OpenBLAS is faster)";
  }
  const install = Deno.build.os === "linux"
    ? "install libopenblas0-pthread (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread)"
    : "install OpenBLAS (libopenblas on the library path)";
  return `matmul: no BLAS library found, so WebAssembly SIMD runs it (slower); ${install} ` +
    "to make it faster";
}

/**
 * dlopen the library; if it is OpenBLAS and fell back to SSE-era kernels on a CPU with
 * AVX2 or AVX-512, open it again with OPENBLAS_CORETYPE naming the kernels the CPU's
 * instruction set allows (unless the user set OPENBLAS_CORETYPE: their choice stands).
 */
function openWithKernels(library: string) {
  const lib = Deno.dlopen(library, SYMBOLS);
  const corename = lib.symbols.openblas_get_corename?.();
  if (!corename || Deno.env.get("OPENBLAS_CORETYPE") !== undefined) return lib;
  if (!OPENBLAS_FALLBACK_CORES.includes(Deno.UnsafePointerView.getCString(corename))) return lib;
  const better = coreTypeFromCpuFlags();
  if (!better) return lib;
  lib.close();
  // OpenBLAS reads the variable when it is loaded.
  Deno.env.set("OPENBLAS_CORETYPE", better);
  return Deno.dlopen(library, SYMBOLS);
}

/** The best OpenBLAS kernel set for the instruction set Linux reports, or null. */
export function coreTypeFromCpuFlags(): string | null {
  let cpuinfo: string;
  try {
    cpuinfo = Deno.readTextFileSync("/proc/cpuinfo");
  } catch {
    return null; // not Linux
  }
  const flags = new Set(/^flags\s*:(.*)$/m.exec(cpuinfo)?.[1].trim().split(/\s+/) ?? []);
  const all = (names: string[]) => names.every((f) => flags.has(f));
  if (all(["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"])) return "SkylakeX";
  if (all(["avx2", "fma"])) return "Haswell";
  return null;
}
