// The matmul kernel ladder (naive, tiled, blocked, gemv: kernels/matmul*.wgsl) against the
// CPU reference: every kernel, every weight dtype, with and without bias, ragged odd
// sizes (so the vec4 loads fall back to scalar ones), a chunked run with 4 KiB bindings,
// and what "auto" picks.

import assert from "node:assert";
import type { Backend, WeightDType } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import {
  MATMUL_AUTO_GEMV_MAX_ROWS,
  MATMUL_AUTO_PREFILL,
  MATMUL_KERNELS,
  type WebGpuBackend,
} from "../lib/backend/webgpu/mod.ts";
import { checkMatmulAgainstCpu, seededInputs, webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;
const cpu = new CpuBackend({ reference: true }); // the oracle: plain loops, no BLAS
const SMALL_BINDING = 4096;

const maxErrors = new Map<string, number>();
const { randn } = seededInputs(0x5eed1ad);

const checkMatmul = (
  be: Backend,
  label: string,
  size: number[],
  dtype: WeightDType,
  withBias: boolean,
) =>
  checkMatmulAgainstCpu(
    be,
    cpu,
    maxErrors,
    randn,
    `matmul ${label} ${dtype}`,
    size,
    dtype,
    withBias,
  );

// [N, K, M]: odd K (scalar fallbacks), K a multiple of 4 and 8 (vec4 paths), N across
// gemv's 8-row groups and the blocked kernel's 64-row (N <= 64) and 128-row tiles, M across
// its 128-column tiles.
const LADDER_SIZES = [
  [1, 3, 1],
  [64, 72, 40],
  [1, 67, 33],
  [3, 17, 130],
  [17, 33, 67],
  [33, 130, 17],
  [130, 67, 3],
  [1, 128, 130],
  [9, 64, 33],
  [67, 130, 130],
  [130, 128, 131],
];

for (const kernel of MATMUL_KERNELS) {
  Deno.test({
    name: `webgpu matmul kernel "${kernel}" matches cpu: every dtype, bias or not, ragged sizes`,
    ignore,
    async fn() {
      const be = gpu!.withOptions({ matmulKernel: kernel });
      for (const dtype of ["F32", "F16", "BF16"] as const) {
        for (const size of LADDER_SIZES) {
          await checkMatmul(be, kernel, size, dtype, false);
          await checkMatmul(be, kernel, size, dtype, true);
        }
      }
    },
  });

  Deno.test({
    name: `webgpu matmul kernel "${kernel}" with 4 KiB bindings (chunked) matches cpu`,
    ignore,
    async fn() {
      const be = gpu!.withOptions({ matmulKernel: kernel, maxBindingBytes: SMALL_BINDING });
      // [65, 129] bf16 (15 rows a chunk, rows start mid-word), x [33, 129] and out [33, 65]
      // in row ranges that start mid-row.
      await checkMatmul(be, `${kernel} chunked`, [33, 129, 65], "BF16", true);
      await checkMatmul(be, `${kernel} chunked`, [7, 63, 33], "F16", true);
      await checkMatmul(be, `${kernel} chunked`, [70, 64, 20], "F32", false);
      // Few rows (gemv's path under "auto"): x [5, 260] in 2 row ranges (1040-byte rows),
      // the second from mid-row; K a multiple of 4 but not 8 (vec4 x, scalar bf16 words).
      await checkMatmul(be, `${kernel} chunked`, [5, 260, 40], "BF16", true);
      // The split really happened: [320, 64] bf16 is 10 chunks of 32 rows, and out
      // [150, 320] (1280-byte rows, 3 to a 4 KiB binding) 50 row ranges.
      const before = be.dispatches;
      await checkMatmul(be, `${kernel} chunked`, [150, 64, 320], "BF16", false);
      assert.equal(be.dispatches - before, 10 * 50);
    },
  });
}

Deno.test({
  name:
    `webgpu matmul "auto" runs gemv up to ${MATMUL_AUTO_GEMV_MAX_ROWS} rows, else ${MATMUL_AUTO_PREFILL}`,
  ignore,
  async fn() {
    const auto = gpu as WebGpuBackend;
    assert.equal(auto.matmulKernel, "auto"); // the default
    assert.equal(auto.matmulKernelFor(1), "gemv");
    assert.equal(auto.matmulKernelFor(MATMUL_AUTO_GEMV_MAX_ROWS), "gemv");
    assert.equal(auto.matmulKernelFor(MATMUL_AUTO_GEMV_MAX_ROWS + 1), MATMUL_AUTO_PREFILL);
    // A forced kernel is used at any N, and withMaxBindingBytes keeps it.
    const naive = auto.withOptions({ matmulKernel: "naive" });
    assert.equal(naive.matmulKernelFor(1), "naive");
    assert.equal(naive.withMaxBindingBytes(SMALL_BINDING).matmulKernelFor(1), "naive");
    assert.equal(naive.withMaxBindingBytes(SMALL_BINDING).maxBindingBytes, SMALL_BINDING);
    await checkMatmul(auto, "auto", [1, 67, 33], "BF16", true);
    await checkMatmul(auto, "auto", [MATMUL_AUTO_GEMV_MAX_ROWS + 1, 67, 33], "BF16", true);
    assert.throws(
      () => auto.withOptions({ matmulKernel: "fastest" as "auto" }),
      /unknown matmul kernel/,
    );
  },
});

Deno.test({
  name: "webgpu matmul ladder worst errors per kernel and dtype (report)",
  ignore,
  fn() {
    for (const [op, err] of [...maxErrors].sort()) console.log(`  ${op}: ${err.toExponential(2)}`);
  },
});
