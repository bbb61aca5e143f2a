// What every script shares: --help text, a clean one-line error and exit code 1 for
// bad input (no stack trace for errors the user can fix), and backend selection.

import { parseArgs, type ParseArgsConfig } from "node:util";
import type { Backend } from "./backend/backend.ts";
import { CpuBackend } from "./backend/cpu.ts";
import { noBlasNotice } from "./backend/blas.ts";

/** A mistake in the user's input: printed without a stack trace. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

export function parseCli<T extends NonNullable<ParseArgsConfig["options"]>>(
  usage: string,
  options: T,
  args = Deno.args,
) {
  let parsed: { values: Record<string, string | boolean | undefined> };
  try {
    parsed = parseArgs({
      args,
      options: { ...options, help: { type: "boolean", short: "h" } },
      strict: true,
      allowPositionals: false,
    });
  } catch (e) {
    throw new UsageError(`${(e as Error).message}\n\n${usage}`);
  }
  if (parsed.values.help) {
    console.log(usage);
    Deno.exit(0);
  }
  return parsed.values as { [K in keyof T]?: T[K] extends { type: "boolean" } ? boolean : string };
}

/** Run a script's main; expected errors become "error: <message>" and exit code 1. */
export async function runMain(main: () => Promise<void>): Promise<void> {
  try {
    await main();
  } catch (e) {
    const err = e as Error;
    const expected = [
      "UsageError",
      "SafetensorsError",
      "CheckpointError",
      "ConfigError",
      "DataError",
      "ResultsError",
      "SpillError",
      "TrainingDivergedError",
    ];
    console.error(`error: ${expected.includes(err.name) ? err.message : err.stack ?? err.message}`);
    Deno.exit(1);
  }
}

export async function createBackend(name: string | undefined): Promise<Backend> {
  switch (name ?? "cpu") {
    case "cpu": {
      // Said when the work starts (the first product), so a bad input's error comes first.
      const notice = noBlasNotice();
      return new CpuBackend(notice ? { onWasmMatmul: () => console.error(notice) } : {});
    }
    case "cpu-reference":
      return new CpuBackend({ reference: true });
    case "webgpu": {
      // Loaded only when asked for, so CPU runs need no --unstable-webgpu.
      const { createWebGpuBackend } = await import("./backend/webgpu/mod.ts");
      return await createWebGpuBackend();
    }
    default:
      throw new UsageError(`unknown backend "${name}" (cpu, cpu-reference, webgpu)`);
  }
}

export function positiveInt(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new UsageError(`--${name} must be a positive integer, got "${value}"`);
  }
  return n;
}
