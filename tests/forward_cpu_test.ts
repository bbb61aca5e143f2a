import { CpuBackend } from "../lib/backend/cpu.ts";
import { checkGolden, DEFAULT_MODEL, FIXTURE_ROOT, FIXTURES } from "./golden.ts";

// The CPU paths: the plain reference loops, the default (BLAS when present) and the
// WebAssembly matmul (the default without BLAS).
for (
  const [label, backend] of [
    ["reference", new CpuBackend({ reference: true })],
    ["blas", new CpuBackend()],
    ["wasm", new CpuBackend({ wasmMatmul: true })],
  ] as const
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
