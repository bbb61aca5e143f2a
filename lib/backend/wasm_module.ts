// The WebAssembly modules the CPU backend runs (simd.wat's elementwise kernels, gemm.wat's
// matmul) are shipped as base64 and work in their own memory, which grows on demand.

/** A module from its base64 bytes, and a view of its memory at least `floats` long. */
export function instantiateWasm(
  base64: string,
): { exports: WebAssembly.Exports; heap: (floats: number) => Float32Array } {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const { exports } = new WebAssembly.Instance(new WebAssembly.Module(bytes));
  const memory = exports.memory as WebAssembly.Memory;
  let view = new Float32Array(memory.buffer);
  const heap = (floats: number) => {
    if (view.length < floats) {
      memory.grow(Math.ceil((floats * 4 - memory.buffer.byteLength) / 65536));
      view = new Float32Array(memory.buffer); // growing detaches the old view
    }
    return view;
  };
  return { exports, heap };
}
