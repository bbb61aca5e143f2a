// forward's logitRows: only the rows an evaluation scores go through the LM head. Their
// logits are those of the full forward, on the CPU and on WebGPU; a bad row is an error.
import assert from "node:assert";
import type { Backend } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import { DEFAULT_MODEL } from "./golden.ts";
import { maxRelError } from "./util.ts";
import { webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const batch = 3, seqLen = 37;
const ids = Int32Array.from({ length: batch * seqLen }, (_, i) => (i * 7919 + 5) % 256);
const rows = Int32Array.from([110, 0, 36, 37, 73, 5]); // any order, across sequences

for (const [label, backend] of [["cpu", () => new CpuBackend()], ["webgpu", () => gpu!]] as const) {
  Deno.test({
    name: `${label} forward with logitRows gives those rows of the full logits`,
    ignore: label === "webgpu" && gpu === null,
    async fn() {
      const model = await Model.load(DEFAULT_MODEL, backend() as Backend);
      const vocab = model.spec.vocab;
      const full = (await forward(model, ids, { batch, seqLen })).logits;
      const some = (await forward(model, ids, { batch, seqLen }, { logitRows: rows })).logits;
      assert.equal(some.length, rows.length * vocab);
      rows.forEach((row, i) => {
        const want = full.subarray(row * vocab, (row + 1) * vocab);
        const error = maxRelError(some.subarray(i * vocab, (i + 1) * vocab), want);
        // A few rows take the matrix-vector kernels (sgemv, gemv), a different f32 summation
        // order than the full matmul's over the 256 hidden values: 1e-6 here.
        assert(error < 1e-5, `row ${row}: off by ${error} of the largest logit`);
      });
      await assert.rejects(
        forward(model, ids, { batch, seqLen }, { logitRows: Int32Array.from([3, 111]) }),
        /forward: logit row 111 out of \[0, 111\)/,
      );
    },
  });
}
