// deno task test: the test suite on a machine set up for it. On Linux the tests need the
// Vulkan loader and a Vulkan driver (Mesa's software one, lavapipe, where there is no GPU)
// for the WebGPU tests, and OpenBLAS for the CPU backend's fast path. What is missing is
// installed first when this runs as root (or with password-less sudo) on a system with apt;
// otherwise it stops at once and prints the one command to run. Then `deno test` runs with
// the environment CI uses (.ci/run calls this same task).

import { parseCli, runMain } from "../lib/cli.ts";

const USAGE = `Usage: deno task test [deno test options and test files]

Checks that the tests' system libraries are there (Linux: libvulkan1, a Vulkan driver such as
mesa-vulkan-drivers, libopenblas0-pthread), installs the missing ones with apt-get when it
runs as root or with password-less sudo (else prints the command to run and stops), then runs
\`deno test -A --unstable-webgpu\` on tests/ (or on the files given) with:
  DENO_WEBGPU_BACKEND=vulkan      (Linux) Vulkan only: never Mesa's software OpenGL
  MESA_SHADER_CACHE_DISABLE=true  no shader disk cache
  XDG_RUNTIME_DIR=<a temp dir>    where unset (wgpu probes for a Wayland display)
each unless already set. Other arguments go to deno test as given.`;

/** A Debian package the tests need, and how to tell that it is installed. */
interface Requirement {
  pkg: string;
  why: string;
  present: () => boolean;
}

const canOpen = (names: string[]) => () =>
  names.some((name) => {
    try {
      Deno.dlopen(name, {}).close();
      return true;
    } catch {
      return false;
    }
  });

// Where the Vulkan loader looks for drivers (ICD manifests), system-wide.
const ICD_DIRS = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"];

function hasVulkanDriver(): boolean {
  return ICD_DIRS.some((dir) => {
    try {
      return [...Deno.readDirSync(dir)].some((e) => e.name.endsWith(".json"));
    } catch {
      return false;
    }
  });
}

export const LINUX_REQUIREMENTS: Requirement[] = [
  { pkg: "libvulkan1", why: "the Vulkan loader", present: canOpen(["libvulkan.so.1"]) },
  {
    pkg: "mesa-vulkan-drivers",
    why: "a Vulkan driver: Mesa's software one where there is no GPU",
    present: hasVulkanDriver,
  },
  {
    pkg: "libopenblas0-pthread",
    why: "OpenBLAS, the CPU backend's fast matmul",
    present: canOpen(["libopenblas.so.0", "libopenblas.so"]),
  },
];

/** What to do about missing packages: nothing, install them (with or without sudo), or stop. */
export type SetupPlan =
  | { action: "run" }
  | { action: "install"; command: string[] }
  | { action: "stop"; message: string };

export function setupPlan(
  missing: { pkg: string; why: string }[],
  can: { root: boolean; sudo: boolean; apt: boolean },
): SetupPlan {
  if (missing.length === 0) return { action: "run" };
  const pkgs = missing.map((m) => m.pkg);
  const list = missing.map((m) => `${m.pkg} (${m.why})`).join(", ");
  const install = ["apt-get", "install", "-y", "--no-install-recommends", ...pkgs];
  if (can.apt && (can.root || can.sudo)) {
    return { action: "install", command: can.root ? install : ["sudo", ...install] };
  }
  const command = can.apt
    ? `sudo apt-get update && sudo ${install.join(" ")}`
    : `install the equivalents of ${pkgs.join(", ")} with your system's package manager`;
  return {
    action: "stop",
    message: `the tests need ${list}, which this machine lacks. Run:\n\n  ${command}\n\n` +
      "then this command again.",
  };
}

function succeeds(cmd: string, args: string[]): boolean {
  try {
    return new Deno.Command(cmd, { args, stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false; // not installed
  }
}

async function run(cmd: string[], env: Record<string, string> = {}): Promise<number> {
  const child = new Deno.Command(cmd[0], { args: cmd.slice(1), env }).spawn();
  return (await child.status).code;
}

async function setUp(): Promise<void> {
  if (Deno.build.os !== "linux") return; // macOS: Metal and Accelerate are part of the system
  const missing = LINUX_REQUIREMENTS.filter((r) => !r.present());
  const plan = setupPlan(missing, {
    root: Deno.uid() === 0,
    sudo: Deno.uid() !== 0 && succeeds("sudo", ["-n", "true"]),
    apt: succeeds("apt-get", ["--version"]),
  });
  if (plan.action === "run") return;
  if (plan.action === "stop") {
    console.error(`error: ${plan.message}`);
    Deno.exit(1);
  }
  const sudo = plan.command[0] === "sudo" ? ["sudo"] : [];
  console.error(`installing ${missing.map((m) => m.pkg).join(", ")} (${plan.command.join(" ")})`);
  const env = { DEBIAN_FRONTEND: "noninteractive" };
  const fail = (message: string) => {
    console.error(`error: ${message}`);
    Deno.exit(1);
  };
  if (await run([...sudo, "apt-get", "update", "-qq"], env) !== 0) fail("apt-get update failed");
  if (await run(plan.command, env) !== 0) fail(`${plan.command.join(" ")} failed`);
  const still = LINUX_REQUIREMENTS.filter((r) => !r.present()).map((r) => r.pkg);
  if (still.length > 0) fail(`still missing after apt-get install: ${still.join(", ")}`);
}

/** The environment the tests run with: CI's settings, unless set already. */
export function testEnv(env: Record<string, string | undefined>): Record<string, string> {
  const out: Record<string, string> = {};
  const defaults: Record<string, () => string> = {
    // Vulkan only. Left alone, wgpu also probes OpenGL, loading Mesa's swrast GL driver (a
    // second llvmpipe with its own threads) beside lavapipe: a CI run once aborted at exit
    // with "double free or corruption" after every test had passed.
    ...(Deno.build.os === "linux" ? { DENO_WEBGPU_BACKEND: () => "vulkan" } : {}),
    // No shader disk cache: a fresh machine gains nothing from one, and its writer threads
    // were part of that exit crash (reproduced once in 8 cold-cache runs).
    MESA_SHADER_CACHE_DISABLE: () => "true",
    // wgpu probes for a Wayland display and complains without it; harmless but noisy.
    XDG_RUNTIME_DIR: () => Deno.makeTempDirSync({ prefix: "moe-condense-xdg-" }),
  };
  for (const [name, value] of Object.entries(defaults)) {
    if (env[name] === undefined) out[name] = value();
  }
  return out;
}

/** deno test's arguments: the user's, with tests/ added where they name no file or folder. */
export function testArgs(args: string[]): string[] {
  const namesPath = args.some((a) => {
    try {
      Deno.statSync(a);
      return true;
    } catch {
      return false;
    }
  });
  const all = new URL("../tests/", import.meta.url).pathname;
  return ["test", "-A", "--unstable-webgpu", ...args, ...(namesPath ? [] : [all])];
}

if (import.meta.main) {
  await runMain(async () => {
    if (Deno.args.includes("-h") || Deno.args.includes("--help")) parseCli(USAGE, {});
    await setUp();
    const code = await run([Deno.execPath(), ...testArgs(Deno.args)], testEnv(Deno.env.toObject()));
    Deno.exit(code);
  });
}
