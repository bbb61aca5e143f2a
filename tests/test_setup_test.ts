// deno task test's set-up (scripts/test.ts): what it does about missing system packages, the
// environment the tests get, and which files deno test runs. The install itself is not run.
import assert from "node:assert";
import { LINUX_REQUIREMENTS, setupPlan, testArgs, testEnv } from "../scripts/test.ts";

const missing = [
  { pkg: "mesa-vulkan-drivers", why: "a Vulkan driver" },
  { pkg: "libopenblas0-pthread", why: "OpenBLAS" },
];
const install = ["apt-get", "install", "-y", "--no-install-recommends"];

Deno.test("test set-up: nothing missing runs the tests; root or sudo installs with apt", () => {
  assert.deepEqual(setupPlan([], { root: false, sudo: false, apt: false }), { action: "run" });
  assert.deepEqual(setupPlan(missing, { root: true, sudo: false, apt: true }), {
    action: "install",
    command: [...install, "mesa-vulkan-drivers", "libopenblas0-pthread"],
  });
  assert.deepEqual(setupPlan(missing, { root: false, sudo: true, apt: true }), {
    action: "install",
    command: ["sudo", ...install, "mesa-vulkan-drivers", "libopenblas0-pthread"],
  });
});

Deno.test("test set-up: without root or apt it stops with the one command to run", () => {
  const noRoot = setupPlan(missing, { root: false, sudo: false, apt: true });
  assert.equal(noRoot.action, "stop");
  assert.match(
    (noRoot as { message: string }).message,
    /\n\n {2}sudo apt-get update && sudo apt-get install -y --no-install-recommends mesa-vulkan-drivers libopenblas0-pthread\n\n/,
  );
  const noApt = setupPlan(missing, { root: true, sudo: false, apt: false });
  assert.equal(noApt.action, "stop");
  assert.match((noApt as { message: string }).message, /mesa-vulkan-drivers \(a Vulkan driver\)/);
});

Deno.test("test set-up: this machine has what the tests need (CI installs it)", () => {
  if (Deno.build.os !== "linux" || Deno.env.get("CI") !== "true") return;
  const absent = LINUX_REQUIREMENTS.filter((r) => !r.present()).map((r) => r.pkg);
  assert.deepEqual(absent, []);
});

Deno.test("test set-up: CI's environment unless set, and tests/ unless files are named", () => {
  const env = testEnv({});
  if (Deno.build.os === "linux") assert.equal(env.DENO_WEBGPU_BACKEND, "vulkan");
  assert.equal(env.MESA_SHADER_CACHE_DISABLE, "true");
  assert(Deno.statSync(env.XDG_RUNTIME_DIR).isDirectory);
  Deno.removeSync(env.XDG_RUNTIME_DIR);
  const mine = {
    DENO_WEBGPU_BACKEND: "gl",
    MESA_SHADER_CACHE_DISABLE: "false",
    XDG_RUNTIME_DIR: "/x",
  };
  assert.deepEqual(testEnv(mine), {});

  const all = new URL("../tests/", import.meta.url).pathname;
  assert.deepEqual(testArgs([]), ["test", "-A", "--unstable-webgpu", all]);
  assert.deepEqual(testArgs(["--filter", "cpu matmul"]), [
    "test",
    "-A",
    "--unstable-webgpu",
    "--filter",
    "cpu matmul",
    all,
  ]);
  const file = new URL(import.meta.url).pathname;
  assert.deepEqual(testArgs([file]), ["test", "-A", "--unstable-webgpu", file]);
});
