// The bench's f32 peak probe (kernels/roofline.wgsl): fma_peak runs every FMA of every
// chain (its values are exact in f32, so they are known).

import assert from "node:assert";
import { webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;

Deno.test({
  name: "webgpu roofline: fma_peak runs every FMA (exact values) and bad sizes are errors",
  ignore,
  async fn() {
    // Three steps of x * 0.5 + 0.25 are exact in f32; after a hundred every chain is 0.5.
    const threads = 512;
    for (const iterations of [0, 3, 100]) {
      const out = gpu!.fmaChains(threads, iterations);
      const got = await gpu!.read(out);
      for (let t = 0; t < threads; t++) {
        let want = 0;
        for (let c = 0; c < 8; c++) {
          for (let j = 0; j < 4; j++) {
            let x = t / 2 ** 20 + j / 2 ** 22 + c / 2 ** 20;
            for (let i = 0; i < iterations; i++) x = Math.fround(x * 0.5 + 0.25);
            want += x;
          }
        }
        assert(Math.abs(got[t] - want) <= 1e-6 * want, `thread ${t}, ${iterations}: ${got[t]}`);
      }
      gpu!.free(out);
    }
    assert.throws(() => gpu!.fmaChains(100, 1), /not 1 to 65,535 workgroups/);
    assert.throws(() => gpu!.fmaChains(0, 1), /not 1 to 65,535 workgroups/);
  },
});
