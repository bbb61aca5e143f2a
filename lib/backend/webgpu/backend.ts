// The WebGPU backend: every op, gathered from the family files by inheritance
// (core -> rows -> matmul -> attention -> moe -> training).

import type { DeviceCompressedExperts, TrainingBackend } from "../backend.ts";
import type { WebGpuOptions } from "./options.ts";
import { WebGpuTraining } from "./training.ts";

export class WebGpuBackend extends WebGpuTraining
  implements TrainingBackend, DeviceCompressedExperts {
  readonly name = "webgpu" as const;
  readonly f32Weights = false;

  /** A backend on the same device with these options changed (the rest kept). */
  withOptions(opts: WebGpuOptions): WebGpuBackend {
    // Shared state: tensors pass between the two and their commands stay in one order.
    return new WebGpuBackend(
      this.device,
      this.description,
      { ...this.opts, ...opts },
      this.shared,
    );
  }

  /** A backend on the same device with a smaller binding limit (tests of chunking). */
  withMaxBindingBytes(maxBindingBytes: number): WebGpuBackend {
    return this.withOptions({ maxBindingBytes });
  }
}
