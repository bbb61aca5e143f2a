// WebGPU backend: the same ops as cpu.ts, run as WGSL compute kernels (kernels/*.wgsl).
// Activations are f32 storage buffers. Weights stay in their checkpoint dtype (bf16/f16
// packed two per u32, decoded in the shader) and are split into row chunks so that no
// binding exceeds the adapter's maxStorageBufferBindingSize; activations larger than the
// limit are bound in row ranges. Dispatches are recorded into one open command encoder
// and submitted together when a result is read (or a batch fills up), so a forward pass
// costs a few submits per layer instead of one per kernel. queue.writeBuffer runs before
// any unsubmitted command, so a buffer freed while commands are pending is not handed to
// an upload until the batch is submitted (see release/acquire).
//
// One file per concern, as kernels/ holds one WGSL file per kernel family:
//   device.ts     the adapter and device (createWebGpuBackend)
//   options.ts    WebGpuOptions and the kernel choices
//   kernels.ts    the WGSL sources and the shared files prepended to them
//   tensors.ts    GpuTensor, GpuWeight (row chunks)
//   core.ts       buffer pool, pipelines, bind groups, batched submission, row ranges
//   rows.ts       embedding, argmax, RMSNorm, elementwise, divergence (forward and backward)
//   matmul.ts     the matmul ladder, SwiGLU epilogue, grouped experts' matmul (and backward)
//   attention.ts  RoPE, the q/k/v split, attention kernels (and backward)
//   moe.ts        routing, the expert plan, routed and compressed experts, row scatter/gather
//   training.ts   trainable weights, gradient sums, cross-entropy, AdamW
//   backend.ts    WebGpuBackend: each file's class extends the one before, this is the last

export { createWebGpuBackend, NATIVE_WEBGPU_BACKENDS, NoWebGpuAdapterError } from "./device.ts";
export { WebGpuBackend } from "./backend.ts";
export {
  ATTENTION_KERNELS,
  type AttentionKernel,
  MATMUL_BACKWARD_KERNELS,
  MATMUL_KERNELS,
  type MatmulBackwardKernel,
  type MatmulKernel,
  type WebGpuOptions,
} from "./options.ts";
export { GpuTensor, GpuWeight } from "./tensors.ts";
export type { KernelTime } from "./core.ts";
export { MATMUL_AUTO_GEMV_MAX_ROWS, MATMUL_AUTO_PREFILL } from "./matmul.ts";
export { attentionBackwardTiling, attentionTiling, ATTN_TILED_MAX_HEAD_DIM } from "./attention.ts";
