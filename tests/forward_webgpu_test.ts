// The full forward pass on WebGPU against the HF reference outputs: every fixture
// architecture (f32 and bf16 checkpoints) and the default model, same tolerances as CPU.

import { checkGolden, DEFAULT_MODEL, FIXTURE_ROOT, FIXTURES } from "./golden.ts";
import { webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests(); // one device for the whole file
const ignore = gpu === null;

for (const name of FIXTURES) {
  Deno.test({
    name: `webgpu forward matches the reference: ${name}`,
    ignore,
    async fn() {
      const r = await checkGolden(`${FIXTURE_ROOT}${name}`, gpu!);
      console.log(`  ${JSON.stringify(r)}`);
    },
  });
}

Deno.test({
  name: "webgpu forward matches the reference: default model tiny-deepseek-moe",
  ignore,
  async fn() {
    const r = await checkGolden(DEFAULT_MODEL, gpu!);
    console.log(`  ${JSON.stringify(r)}`);
  },
});

// With 4 KiB bindings every fixture weight (embedding [256, 64] f32 = 64 KiB: 16 chunks)
// is split into row chunks and the activations [24, 64] / logits [24, 256] are bound in
// row ranges: the chunked paths must give the same answers in a real forward pass.
const chunked = gpu?.withMaxBindingBytes(4096);
for (const name of FIXTURES) {
  Deno.test({
    name: `webgpu forward with 4 KiB bindings (chunked) matches the reference: ${name}`,
    ignore,
    async fn() {
      await checkGolden(`${FIXTURE_ROOT}${name}`, chunked!);
    },
  });
}
