// The WGSL files (kernels/*.wgsl), read once, and the shared files each one is built with.

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
  "elementwise_common",
  "elementwise",
  "rope",
  "attention_window",
  "attention_tiles",
  "attention_common",
  "attention",
  "attention_tiled",
  "attention_split",
  "embedding",
  "argmax",
  "route",
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

// WGSL has no includes: a kernel's module is its file with these shared files prepended
// (module-scope declarations may come in any order). weights.wgsl decodes weights;
// matmul_common.wgsl and matmul_backward_common.wgsl hold the matmuls' params and bindings,
// matmul_grouped.wgsl the grouped ones' tile table, matmul_tiles.wgsl the register-blocked
// tile core of both directions; attention_common.wgsl and attention_backward_common.wgsl
// the attention kernels' params and bindings, attention_window.wgsl the sliding window,
// attention_tiles.wgsl the tiled pair's thread layout and row loads; route.wgsl top-k
// routing's params and softmax (forward and backward), elementwise_common.wgsl what the
// elementwise kernels of both directions share.
const MATMUL_FORWARD: readonly KernelFile[] = ["weights", "matmul_common", "matmul_grouped"];
const ATTENTION_FORWARD: readonly KernelFile[] = ["attention_common", "attention_window"];
const ATTENTION_BACKWARD: readonly KernelFile[] = ["attention_backward_common", "attention_window"];
const PRELUDES: Partial<Record<KernelFile, readonly KernelFile[]>> = {
  matmul: MATMUL_FORWARD,
  matmul_naive: MATMUL_FORWARD,
  matmul_blocked: [...MATMUL_FORWARD, "matmul_tiles"],
  matmul_gemv: MATMUL_FORWARD,
  norm: ["weights"],
  embedding: ["weights"],
  matmul_backward: ["weights", "matmul_backward_common"],
  matmul_backward_blocked: ["weights", "matmul_backward_common", "matmul_grouped", "matmul_tiles"],
  norm_backward: ["weights"],
  attention: ATTENTION_FORWARD,
  attention_tiled: [...ATTENTION_FORWARD, "attention_tiles"],
  attention_split: ATTENTION_FORWARD,
  attention_backward: ATTENTION_BACKWARD,
  attention_backward_tiled: [...ATTENTION_BACKWARD, "attention_tiles"],
  moe: ["route"],
  moe_backward: ["route"],
  elementwise: ["elementwise_common"],
  elementwise_backward: ["elementwise_common"],
};

const kernelSources = new Map<KernelFile, string>();

export async function loadKernelSources(): Promise<void> {
  for (const name of KERNEL_FILES) {
    if (kernelSources.has(name)) continue;
    const url = new URL(`../../../kernels/${name}.wgsl`, import.meta.url);
    kernelSources.set(name, await Deno.readTextFile(url));
  }
}

/** A kernel's WGSL module: its shared files, then its own (loadKernelSources first). */
export function kernelCode(kernel: KernelFile): string {
  return [...PRELUDES[kernel] ?? [], kernel].map((f) => kernelSources.get(f)!).join("\n");
}
