// The CPU backend reuses freed arrays: a fresh array's first writes fault in its pages,
// which took a third of the forward. A reused array must never leak its old values into
// a result, an array handed out by read() belongs to the caller, and freeing a tensor
// twice must not give one array to two tensors.
import assert from "node:assert";
import { CpuBackend, type CpuTensor } from "../lib/backend/cpu.ts";
import { Model } from "../lib/model/model.ts";
import { forward } from "../lib/model/decoder.ts";
import { f32Tensor } from "../lib/io/safetensors.ts";
import { lossAndGrad } from "../lib/train/backward.ts";
import { selectTrainable } from "../lib/train/trainer.ts";
import { zeroGrads } from "./train_fd.ts";
import { DEFAULT_MODEL } from "./golden.ts";
import { assertIdentical, randn } from "./util.ts";

const batch = 3, seqLen = 41;
const tokens = (seed: number) =>
  Int32Array.from({ length: batch * seqLen }, (_, i) => (i * 7919 + seed) % 256);

// Against a backend that keeps nothing: an op that wrongly relied on a zeroed array would
// go wrong within one step on the pooled backend (arrays are reused inside a forward).
const fresh = (threads = 1) => new CpuBackend({ threads, poolBytes: 0 });
const pooled = (threads = 1) => new CpuBackend({ threads });

Deno.test("cpu pool: a forward on reused arrays equals one on fresh arrays", async () => {
  const logits = [];
  for (const threads of [1, 3]) {
    const warm = await Model.load(DEFAULT_MODEL, pooled(threads));
    await forward(warm, tokens(5), { batch, seqLen }); // fills the pool with its values
    logits.push((await forward(warm, tokens(13), { batch, seqLen })).logits);
  }
  const model = await Model.load(DEFAULT_MODEL, fresh());
  const want = (await forward(model, tokens(13), { batch, seqLen })).logits;
  assertIdentical(logits, [want, want], "warm-pool forward on 1 and 3 threads");
});

Deno.test("cpu pool: gradients on reused arrays equal those on fresh arrays", async () => {
  const load = async (be: CpuBackend) => {
    const model = await Model.load(DEFAULT_MODEL, be);
    for (const n of selectTrainable(model, "all")) model.makeTrainable(n);
    return model;
  };
  const step = async (model: Model, seed: number) => {
    const names = selectTrainable(model, "all");
    const grads = await zeroGrads(model, names);
    await lossAndGrad(model, tokens(seed), tokens(seed + 1), { batch, seqLen }, grads);
    return await model.backend.readAll(names.map((n) => grads.get(n)!));
  };
  const warm = await load(pooled());
  await step(warm, 3);
  assertIdentical(await step(warm, 29), await step(await load(fresh()), 29), "gradients");
});

Deno.test("cpu pool: a read array stays the caller's, and a double free is harmless", async () => {
  const be = pooled();
  const weight = be.uploadWeight(f32Tensor("w", [37, 29], randn(37 * 29, 1)));
  const x = be.tensor(randn(11 * 29, 2), [11, 29]);
  const y = be.matmul(x, weight);
  const values = await be.read(y), copy = values.slice();
  be.free(y);
  be.free(be.matmul(x, be.uploadWeight(f32Tensor("w2", [37, 29], randn(37 * 29, 3)))));
  assert.deepStrictEqual(values, copy, "an array from read() was reused");

  const z = be.matmul(x, weight);
  be.free(z), be.free(z);
  const a = be.matmul(x, weight),
    b = be.rmsNorm(a, be.uploadWeight(f32Tensor("n", [37], randn(37, 4))), 1e-6);
  assert.notStrictEqual(await be.read(a), await be.read(b), "two live tensors share one array");
});

Deno.test("cpu pool: a full pool makes room for a newly freed array, the oldest first", () => {
  // Room for one output of 11 rows and one of 13: an evaluation's batches change length,
  // and each forward must still reuse its own arrays rather than find the pool full.
  const k = 29, m = 37, bytes = (rows: number) => 4 * rows * m;
  const be = new CpuBackend({ threads: 1, poolBytes: bytes(11) + bytes(13) });
  const weight = be.uploadWeight(f32Tensor("w", [m, k], randn(m * k, 1)));
  const x11 = be.tensor(randn(11 * k, 2), [11, k]), x13 = be.tensor(randn(13 * k, 3), [13, k]);
  const data = (t: unknown) => (t as CpuTensor).data;
  const a1 = be.matmul(x11, weight), a2 = be.matmul(x11, weight);
  be.free(a1), be.free(a2); // the pool holds both 11-row arrays
  const b1 = be.matmul(x13, weight);
  be.free(b1); // a1's array, freed first, makes room
  assert.strictEqual(data(be.matmul(x13, weight)), data(b1), "the 13-row array was not kept");
  assert.strictEqual(data(be.matmul(x11, weight)), data(a2), "the later 11-row array was dropped");
});
