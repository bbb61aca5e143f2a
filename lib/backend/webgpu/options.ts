// The backend's options and the kernel families they choose between.

export interface WebGpuOptions {
  /**
   * Upper bound on one storage binding in bytes (default: the adapter's limit). Tests set
   * it small to exercise chunking.
   */
  maxBindingBytes?: number;
  /**
   * Which matmul kernel runs (default "auto": gemv for a few rows, else the fastest
   * prefill kernel; see MATMUL_AUTO_*). The others are the ladder, for tests and bench.
   */
  matmulKernel?: MatmulKernel | "auto";
  /**
   * Which kernels run matmulBackward's input and weight gradients (default "auto":
   * "blocked"). "tiled" is kernels/matmul_backward.wgsl, "blocked"
   * matmul_backward_blocked.wgsl.
   */
  matmulBackwardKernel?: MatmulBackwardKernel | "auto";
  /**
   * Which attention kernels run, forward and backward (default "auto": see
   * attentionKernelFor). "naive" is kernels/attention.wgsl and attention_backward.wgsl,
   * "tiled" kernels/attention_tiled.wgsl and attention_backward_tiled.wgsl.
   */
  attentionKernel?: AttentionKernel | "auto";
  /**
   * Flash-decoding (kernels/attention_split.wgsl) for the forward: "auto" (the default)
   * for decode steps over long caches when attentionKernel is "auto", "always" for every
   * shape (tests), "never".
   */
  attentionSplit?: "auto" | "always" | "never";
}

/** The matmul kernels, simplest first: kernels/matmul_<name>.wgsl ("tiled" is matmul.wgsl). */
export const MATMUL_KERNELS = ["naive", "tiled", "blocked", "gemv"] as const;
export type MatmulKernel = (typeof MATMUL_KERNELS)[number];

/** The backward matmul kernels, simplest first: kernels/matmul_backward[_blocked].wgsl. */
export const MATMUL_BACKWARD_KERNELS = ["tiled", "blocked"] as const;
export type MatmulBackwardKernel = (typeof MATMUL_BACKWARD_KERNELS)[number];

/** The attention kernels, simplest first. */
export const ATTENTION_KERNELS = ["naive", "tiled"] as const;
export type AttentionKernel = (typeof ATTENTION_KERNELS)[number];
