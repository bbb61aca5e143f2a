// Compressed experts on WebGPU: the `mul` op against the CPU at odd sizes (plain and
// chunked bindings), and the CE forward pass with random ces against the per-token
// reference and the CPU on every fixture architecture.

import assert from "node:assert";
import { CpuBackend } from "../lib/backend/cpu.ts";
import type { Backend, TrainingBackend } from "../lib/backend/backend.ts";
import type { WebGpuBackend } from "../lib/backend/webgpu/mod.ts";
import { type Grads, lossAndGrad } from "../lib/train/backward.ts";
import {
  type BatchShape,
  forward,
  type ForwardHooks,
  type ForwardOptions,
} from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import { cesNames } from "../lib/methods/compressed_experts.ts";
import type { MlpSpec } from "../lib/model/config.ts";
import { ceVersusReference, INPUT, loadCe, relMaxDiff, SHAPE, uniform } from "./ce_util.ts";
import { DEFAULT_MODEL, FIXTURE_ROOT, FIXTURES } from "./golden.ts";
import { webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;
const chunked = gpu?.withMaxBindingBytes(4096);
const cpu = new CpuBackend({ reference: true });
const MODELS = [...FIXTURES.map((f) => `${FIXTURE_ROOT}${f}`), DEFAULT_MODEL];

Deno.test({
  name: "ce webgpu: mul matches the CPU at odd sizes (plain and chunked bindings)",
  ignore,
  async fn() {
    let worst = 0;
    for (const be of [gpu!, chunked!] as Backend[]) {
      for (const [rows, cols] of [[1, 1], [3, 5], [7, 63], [17, 129], [40, 65]]) {
        const a = uniform(rows * cols, rows * 31 + cols, -2, 2);
        const b = uniform(rows * cols, rows * 17 + cols + 1, -2, 2);
        const want = await cpu.read(
          cpu.mul(cpu.tensor(a, [rows, cols]), cpu.tensor(b, [rows, cols])),
        );
        const ta = be.tensor(a, [rows, cols]), tb = be.tensor(b, [rows, cols]);
        const out = be.mul(ta, tb);
        const got = await be.read(out);
        for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]));
        be.free(ta), be.free(tb), be.free(out);
      }
    }
    console.log(`  max |gpu - cpu| = ${worst}`);
    assert.equal(worst, 0); // one f32 multiply: bit-identical
  },
});

for (const dir of MODELS) {
  const name = dir.split("/").filter(Boolean).pop();
  Deno.test({
    name: `ce webgpu: random ces matches the reference and the CPU: ${name}`,
    ignore,
    async fn() {
      const probe = await Model.load(dir, cpu);
      const moe = probe.spec.layers.find((l) => l.mlp.kind === "moe")!.mlp as Extract<
        MlpSpec,
        { kind: "moe" }
      >;
      const km = Math.max(1, moe.topK >> 1);
      probe.close();
      // (the default model's attention rows do not fit 4 KiB bindings: plain only)
      const backends = (dir === DEFAULT_MODEL ? [gpu!] : [gpu!, chunked!]) as Backend[];
      for (const be of backends) {
        const g = await loadCe(dir, be, km, 300 + km);
        const refErr = await ceVersusReference(g);
        const c = await loadCe(dir, cpu, km, 300 + km);
        const cpuErr = relMaxDiff(
          (await forward(g, INPUT, SHAPE)).logits,
          (await forward(c, INPUT, SHAPE)).logits,
        );
        console.log(
          `  ${be === gpu ? "plain" : "chunked"}: vs reference ${refErr}, vs cpu ${cpuErr}`,
        );
        assert(refErr < 1e-4 && cpuErr < 1e-4, `${name}: ${refErr} ${cpuErr}`);
        g.close(), c.close();
      }
    },
  });
}

// olmoe-a: layer 1's main experts one by one (one is trainable), layer 0's grouped from
// the stacks; deepseek-a k_m = 1 with its main weight renormalised over the top-k (the
// release's rule under norm_topk_prob) and shared experts.
const CE_GRADIENTS = [
  {
    fixture: "olmoe-a",
    km: 2,
    normalize: false,
    names: [
      "model.layers.1.mlp.ces",
      "model.layers.0.mlp.ces",
      "model.layers.1.mlp.gate.weight",
      "model.layers.1.mlp.experts.3.up_proj.weight",
    ],
  },
  {
    fixture: "deepseek-a",
    km: 1,
    normalize: true,
    names: [
      "model.layers.2.mlp.ces",
      "model.layers.3.mlp.gate.weight",
      "model.layers.2.mlp.shared_experts.down_proj.weight",
    ],
  },
];
for (const { fixture, km, normalize, names } of CE_GRADIENTS) {
  Deno.test({
    name: `ce webgpu: CE training gradients (ces, router, experts) match the CPU: ${fixture}`,
    ignore,
    async fn() {
      const grads = async (be: TrainingBackend) => {
        const model = await loadCe(`${FIXTURE_ROOT}${fixture}`, be, km, 900);
        for (const l of model.spec.layers) {
          if (l.mlp.kind === "moe") l.mlp.renorm.normalize ||= normalize;
        }
        for (const n of names) model.makeTrainable(n);
        const g: Grads = new Map();
        for (const n of names) {
          const w = await model.weight(n);
          g.set(n, be.tensor(new Float32Array(w.shape.reduce((a, b) => a * b, 1)), w.shape));
        }
        const targets = Int32Array.from(INPUT, (_, i) => (i % 7 === 6 ? -100 : INPUT[i + 1]));
        const { loss } = await lossAndGrad(model, INPUT, targets, SHAPE, g);
        const out = new Map<string, Float32Array>();
        for (const n of names) out.set(n, (await be.read(g.get(n)!)).slice());
        model.close();
        return { loss, out };
      };
      const c = await grads(cpu), w = await grads(gpu! as unknown as TrainingBackend);
      assert(Math.abs(c.loss - w.loss) < 1e-5, `loss ${w.loss} vs ${c.loss}`);
      for (const n of names) {
        const err = relMaxDiff(w.out.get(n)!, c.out.get(n)!);
        console.log(`  ${n}: rel max diff ${err.toExponential(2)}`);
        assert(err < 1e-5, `${n}: ${err}`);
      }
    },
  });
}

/**
 * The forward of `model` on the host path (an observer of the routing makes every layer
 * read it back and split it on the host), then on the device path: each one's submits
 * and the relative difference of their logits.
 */
async function deviceVersusHost(
  model: Model,
  be: WebGpuBackend,
  ids: Int32Array,
  shape: BatchShape,
  opts: ForwardOptions = {},
) {
  const run = async (hooks: ForwardHooks) => {
    const submits = be.submits;
    const { logits } = await forward(model, ids, shape, { ...opts, ...hooks });
    return { logits, submits: be.submits - submits };
  };
  const host = await run({ onRouter: () => {} });
  const device = await run({});
  return {
    device: device.submits,
    host: host.submits,
    err: relMaxDiff(device.logits, host.logits),
  };
}

Deno.test({
  name: "ce webgpu: the routing stays on the device (one submit a forward), as the host path",
  ignore,
  async fn() {
    // k_m of top-k: 2 of 4, and renormalised (norm_topk_prob=true on OLMoE), 1 of 2
    // (Mixtral renormalises), 1 of 4 (three aux experts)
    // (renormalised: over the top-k, the release's rule, or over the main experts)
    const cases = [
      ["olmoe-a", 2, false, "top_k"],
      ["olmoe-a", 2, true, "top_k"],
      ["olmoe-a", 2, true, "main"],
      ["mixtral-a", 1, false, "top_k"],
      ["mixtral-a", 1, false, "main"],
      ["deepseek-a", 1, false, "top_k"],
    ] as const;
    for (const [fixture, km, renormalise, over] of cases) {
      for (const be of [gpu!, chunked!]) {
        const model = await loadCe(`${FIXTURE_ROOT}${fixture}`, be, km, 500, over);
        for (const layer of model.spec.layers) {
          if (renormalise && layer.mlp.kind === "moe") layer.mlp.renorm.normalize = true;
        }
        const { device, host, err } = await deviceVersusHost(model, be, INPUT, SHAPE);
        console.log(
          `  ${fixture} k_m ${km}${renormalise ? " renormalised" : ""} over ${over} ` +
            `${be === gpu ? "plain" : "chunked"}: ${device} vs ${host} submits, ` +
            `rel max diff ${err.toExponential(2)}`,
        );
        assert.equal(device, 1, `${fixture}: the logits' read alone`);
        assert(host > device, `${fixture}: the host path was not taken`);
        assert(err < 1e-5, `${fixture}: ${err}`);
        model.close();
      }
    }
  },
});

Deno.test({
  name: "ce webgpu: a prefill past 16,384 main pairs plans on the device too (chunked plan)",
  ignore,
  async fn() {
    // 76 x 110 tokens, k_m 2 of top-4: 16,720 main (token, expert) pairs.
    const shape = { batch: 76, seqLen: 110 };
    const ids = Int32Array.from(
      { length: shape.batch * shape.seqLen },
      (_, i) => (i * 37 + 5) % 256,
    );
    const model = await loadCe(`${FIXTURE_ROOT}olmoe-a`, gpu!, 2, 700);
    const rows = Int32Array.from({ length: 64 }, (_, i) => i * 131); // spread over the batch
    const { device, host, err } = await deviceVersusHost(model, gpu!, ids, shape, {
      logitRows: rows,
    });
    console.log(`  ${device} vs ${host} submits, rel max diff ${err.toExponential(2)}`);
    assert.equal(device, 1);
    assert(err < 1e-5, `${err}`);
    model.close();
  },
});

Deno.test({
  name: "ce webgpu: a training ces is read once a layer a forward, also where the host path runs",
  ignore,
  async fn() {
    // 40 tokens' hidden rows overflow 4 KiB bindings: the device path declines and the host
    // path runs. A ces that trains is read at every forward (its slots rebuilt), but once a
    // layer: the declined device path must not have read it already.
    const shape = { batch: 4, seqLen: 10 };
    const ids = Int32Array.from({ length: 40 }, (_, i) => (i * 37 + 5) % 256);
    const be = chunked!;
    const model = await loadCe(`${FIXTURE_ROOT}olmoe-a`, be, 2, 500);
    for (const n of cesNames(model)) model.makeTrainable(n);
    let reads = 0;
    const readWeight = be.readWeight;
    be.readWeight = (w) => (reads++, readWeight.call(be, w));
    try {
      await forward(model, ids, shape);
      assert.equal(reads, cesNames(model).length);
    } finally {
      be.readWeight = readWeight;
      model.close();
    }
  },
});
