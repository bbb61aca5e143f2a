import { CpuBackend } from "../lib/backend/cpu.ts";
import { checkGolden, DEFAULT_MODEL, FIXTURE_ROOT, FIXTURES } from "./golden.ts";

for (const name of FIXTURES) {
  Deno.test(`cpu forward matches the reference: ${name}`, async () => {
    await checkGolden(`${FIXTURE_ROOT}${name}`, new CpuBackend());
  });
}

Deno.test("cpu forward matches the reference: default model tiny-deepseek-moe", async () => {
  await checkGolden(DEFAULT_MODEL, new CpuBackend());
});
