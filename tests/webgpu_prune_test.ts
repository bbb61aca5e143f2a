// Expert pruning on WebGPU: the saliency recorded in the profile pass (the routed experts
// run again from the device's expert stacks) matches the CPU's, and a pruned checkpoint
// runs on the device like on the CPU.

import assert from "node:assert";
import type { Backend } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import { hashModelFolder } from "../lib/io/results.ts";
import { forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";
import { type ExpertSaliency, SaliencyRecorder } from "../lib/methods/expert_saliency.ts";
import { calibrationPass } from "../lib/methods/layer_cache.ts";
import { pruneFromFile } from "../lib/methods/prune_job.ts";
import { RoutingProfiler } from "../lib/methods/routing_profile.ts";
import { FIXTURE_ROOT } from "./golden.ts";
import { maxRelError } from "./util.ts";
import { webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;

async function saliencyOn(dir: string, backend: Backend): Promise<ExpertSaliency> {
  const model = await Model.load(dir, backend);
  const recorder = new SaliencyRecorder();
  const shape = { batch: 3, seqLen: 13 }; // odd sizes
  const ids = Int32Array.from({ length: 39 }, (_, i) => (i * 7919 + 11) % 256);
  await calibrationPass(model, [{ ids, shape, docIndex: [0, 1, 2] }], new RoutingProfiler(), {
    keepCache: false,
    onMoe: (l, xn, routing) => recorder.observe(model, l, xn, routing),
  });
  model.close();
  return recorder.result();
}

for (const fixture of ["qwen2_moe-bf16", "deepseek-a"]) {
  Deno.test({
    name: `WebGPU saliency and pruned forward = CPU: ${fixture}`,
    ignore,
    fn: async () => {
      const dir = `${FIXTURE_ROOT}${fixture}`;
      const cpu = await saliencyOn(dir, new CpuBackend());
      const dev = await saliencyOn(dir, gpu!);
      for (const [l, c] of Object.entries(cpu.layers)) {
        const d = dev.layers[l];
        assert.deepStrictEqual(d.freq, c.freq, `${fixture} layer ${l}: routing differs`);
        for (const k of ["weight", "norm", "reap"] as const) {
          const err = maxRelError(d[k], c[k]);
          assert(err < 1e-4, `${fixture} layer ${l} ${k}: ${err}`);
        }
      }
      const root = await Deno.makeTempDir();
      try {
        const profile = `${root}/profile.json`;
        await Deno.writeTextFile(
          profile,
          JSON.stringify({
            kind: "routing-profile",
            schema_version: 1,
            model: { path: dir, hash: await hashModelFolder(dir) },
            saliency: cpu,
          }),
        );
        await pruneFromFile({
          source: { kind: "profile", path: profile },
          criterion: "reap",
          ratio: 0.5,
        }, `${root}/pruned`);
        const ids = Int32Array.from({ length: 12 }, (_, i) => (i * 37 + 5) % 256);
        const logits = async (backend: Backend) => {
          const m = await Model.load(`${root}/pruned`, backend);
          const out = (await forward(m, ids, { batch: 1, seqLen: 12 })).logits;
          m.close();
          return out;
        };
        const err = maxRelError(await logits(gpu!), await logits(new CpuBackend()));
        assert(err < 1e-4, `${fixture}: pruned model on WebGPU vs CPU ${err}`);
      } finally {
        await Deno.remove(root, { recursive: true });
      }
    },
  });
}
