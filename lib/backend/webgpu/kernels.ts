// The WGSL files (kernels/*.wgsl), read once, and the shared files each one gets prepended.

export const KERNEL_FILES = [
  "weights",
  "matmul_common",
  "matmul_grouped",
  "matmul",
  "matmul_naive",
  "matmul_tiles",
  "matmul_blocked",
  "matmul_gemv",
  "norm",
  "elementwise",
  "rope",
  "attention_common",
  "attention",
  "attention_tiled",
  "attention_split",
  "embedding",
  "argmax",
  "moe",
  // backward (training)
  "matmul_backward_common",
  "matmul_backward",
  "matmul_backward_blocked",
  "norm_backward",
  "elementwise_backward",
  "attention_backward_common",
  "attention_backward",
  "attention_backward_tiled",
  "moe_backward",
  "loss",
  "adamw",
  // the searches
  "divergence",
  // the bench's f32 peak probe
  "roofline",
] as const;
export type KernelFile = (typeof KERNEL_FILES)[number];

// Kernels that decode weights get kernels/weights.wgsl prepended.
export const USES_WEIGHTS: ReadonlySet<KernelFile> = new Set([
  "matmul",
  "matmul_naive",
  "matmul_blocked",
  "matmul_gemv",
  "norm",
  "embedding",
  "matmul_backward",
  "matmul_backward_blocked",
  "norm_backward",
]);

// The forward matmul ladder gets kernels/matmul_common.wgsl (params, bindings) as well.
export const MATMUL_FORWARD: ReadonlySet<KernelFile> = new Set([
  "matmul",
  "matmul_naive",
  "matmul_blocked",
  "matmul_gemv",
]);
// The backward ones kernels/matmul_backward_common.wgsl, and the register-blocked ones of
// both directions the tile core, kernels/matmul_tiles.wgsl.
export const MATMUL_BACKWARD: ReadonlySet<KernelFile> = new Set([
  "matmul_backward",
  "matmul_backward_blocked",
]);
// The grouped ones (forward, and the blocked input gradient) the tile table,
// kernels/matmul_grouped.wgsl.
export const MATMUL_GROUPED: ReadonlySet<KernelFile> = new Set([
  ...MATMUL_FORWARD,
  "matmul_backward_blocked",
]);
export const MATMUL_TILES: ReadonlySet<KernelFile> = new Set([
  "matmul_blocked",
  "matmul_backward_blocked",
]);

// The forward attention kernels get kernels/attention_common.wgsl (params, bindings), the
// backward ones kernels/attention_backward_common.wgsl.
export const ATTENTION_FORWARD: ReadonlySet<KernelFile> = new Set([
  "attention",
  "attention_tiled",
  "attention_split",
]);
export const ATTENTION_BACKWARD: ReadonlySet<KernelFile> = new Set([
  "attention_backward",
  "attention_backward_tiled",
]);

export const kernelSources = new Map<KernelFile, string>();

export async function loadKernelSources(): Promise<void> {
  for (const name of KERNEL_FILES) {
    if (kernelSources.has(name)) continue;
    const url = new URL(`../../../kernels/${name}.wgsl`, import.meta.url);
    kernelSources.set(name, await Deno.readTextFile(url));
  }
}
