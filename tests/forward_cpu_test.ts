import { CpuBackend } from "../lib/backend/cpu.ts";
import { checkGolden, DEFAULT_MODEL, FIXTURE_ROOT, FIXTURES } from "./golden.ts";

// Both CPU paths: the plain reference loops and the default (BLAS when present).
for (
  const [label, backend] of [["reference", new CpuBackend({ reference: true })], [
    "blas",
    new CpuBackend(),
  ]] as const
) {
  for (const name of FIXTURES) {
    Deno.test(`cpu (${label}) forward matches the reference: ${name}`, async () => {
      await checkGolden(`${FIXTURE_ROOT}${name}`, backend);
    });
  }
  Deno.test(`cpu (${label}) forward matches the reference: default model tiny-deepseek-moe`, async () => {
    await checkGolden(DEFAULT_MODEL, backend);
  });
}
