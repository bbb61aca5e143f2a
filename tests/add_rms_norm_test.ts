// addRmsNorm (the residual add and the next norm in one pass) against add then rmsNorm on
// the same backend: exactly equal on the CPU, bit for bit on WebGPU (one kernel, the same
// f32 sums and reduction tree), for every weight dtype, odd widths, and 4 KiB bindings;
// and the WebGPU result against the CPU reference. Mismatched inputs are named errors.

import assert from "node:assert";
import type { Backend, Tensor, WeightDType } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { rawWeight, relError, seededInputs, webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const cpu = new CpuBackend({ reference: true });
const { randn } = seededInputs(0xadd4);
const DTYPES: WeightDType[] = ["F32", "F16", "BF16"];
// [rows, cols]: one entry, odd widths below and above the kernel's 256 threads, many rows.
const SIZES = [[1, 1], [3, 5], [7, 300], [40, 64], [33, 257]];
// As the rmsNorm test in webgpu_ops_test.ts.
const NORM_TOL = 4e-6;

/** addRmsNorm and add-then-rmsNorm of the same inputs on `be`, read back. */
async function both(be: Backend, n: number, d: number, dtype: WeightDType) {
  const aData = randn(n * d, 3), bData = randn(n * d, 3);
  const raw = rawWeight("ln", [d], randn(d), dtype);
  const a = be.tensor(aData, [n, d]), b = be.tensor(bData, [n, d]), w = be.uploadWeight(raw);
  const fused = be.addRmsNorm(a, b, w, 1e-6);
  const sum = be.add(a, b);
  const normed = be.rmsNorm(sum, w, 1e-6);
  const read = async (x: Tensor) => {
    assert.deepEqual([...x.shape], [n, d]);
    const data = (await be.read(x)).slice();
    be.free(x);
    return data;
  };
  const got = { sum: await read(fused.sum), normed: await read(fused.normed) };
  const want = { sum: await read(sum), normed: await read(normed) };
  be.free(a), be.free(b), be.freeWeight(w);
  return { got, want, aData, bData, raw };
}

Deno.test("cpu addRmsNorm gives exactly add then rmsNorm", async () => {
  for (const dtype of DTYPES) {
    for (const [n, d] of SIZES) {
      const { got, want } = await both(cpu, n, d, dtype);
      assert.deepEqual(got.sum, want.sum, `sum ${dtype} [${n}, ${d}]`);
      assert.deepEqual(got.normed, want.normed, `normed ${dtype} [${n}, ${d}]`);
    }
  }
});

function badInputs(be: Backend) {
  const w4 = be.uploadWeight(rawWeight("ln", [4], randn(4), "F32"));
  const a = be.tensor(randn(8), [2, 4]);
  assert.throws(
    () => be.addRmsNorm(a, be.tensor(randn(8), [4, 2]), w4, 1e-6),
    /addRmsNorm: shapes \[2,4\] and \[4,2\] differ/,
  );
  assert.throws(
    () => be.addRmsNorm(a, be.tensor(randn(4), [1, 4]), w4, 1e-6),
    /addRmsNorm: shapes \[2,4\] and \[1,4\] differ/,
  );
  const w5 = be.uploadWeight(rawWeight("ln5", [5], randn(5), "F32"));
  assert.throws(
    () => be.addRmsNorm(a, be.tensor(randn(8), [2, 4]), w5, 1e-6),
    /addRmsNorm: rows of 4 but weight "ln5" is \[5\]/,
  );
}

Deno.test("cpu addRmsNorm rejects mismatched shapes and weights", () => badInputs(cpu));

Deno.test({
  name: "webgpu addRmsNorm is bit for bit add then rmsNorm, close to cpu, plain and chunked",
  ignore: gpu === null,
  async fn() {
    const worst = new Map<string, number>();
    // 4 KiB bindings: [40, 64] rows bound 15 at a time, [7, 300] and [33, 257] 3 at a
    // time from unaligned starts.
    const chunked = gpu!.withMaxBindingBytes(4096);
    for (const be of [gpu!, chunked]) {
      for (const dtype of DTYPES) {
        for (const [n, d] of SIZES) {
          const { got, want, aData, bData, raw } = await both(be, n, d, dtype);
          assert.deepEqual(got.sum, want.sum, `sum ${dtype} [${n}, ${d}]`);
          assert.deepEqual(got.normed, want.normed, `normed ${dtype} [${n}, ${d}]`);
          const ref = cpu.addRmsNorm(
            cpu.tensor(aData, [n, d]),
            cpu.tensor(bData, [n, d]),
            cpu.uploadWeight(raw),
            1e-6,
          );
          assert.deepEqual(got.sum, await cpu.read(ref.sum), "f32 add is exact");
          const err = relError(
            worst,
            `addRmsNorm ${dtype}`,
            got.normed,
            await cpu.read(ref.normed),
          );
          assert(err <= NORM_TOL, `addRmsNorm ${dtype} [${n}, ${d}]: relative error ${err}`);
        }
      }
    }
    // The chunked backend really split: [40, 64] is 3 dispatches of at most 15 rows.
    const before = chunked.dispatches;
    const w = chunked.uploadWeight(rawWeight("ln", [64], randn(64), "BF16"));
    const x = chunked.tensor(randn(40 * 64), [40, 64]);
    chunked.addRmsNorm(x, x, w, 1e-6);
    assert.equal(chunked.dispatches - before, 3);
    badInputs(gpu!);
    for (const [op, err] of worst) console.log(`  ${op}: ${err.toExponential(2)}`);
  },
});
