// Which WebGPU adapters the backend takes: never Mesa's software OpenGL by accident (hours
// for the suite). Unless DENO_WEBGPU_BACKEND names backends, only Vulkan, Metal and DX12 are
// tried; with none, the error names the package that provides a software Vulkan adapter.
// Each case runs in its own process: Deno reads the variable once, at the first request.
import assert from "node:assert";

const WEBGPU = new URL("../lib/backend/webgpu/mod.ts", import.meta.url).href;

/** stdout of a child that creates the backend, with DENO_WEBGPU_BACKEND set or unset. */
async function child(backends: string | undefined): Promise<string> {
  const code = `
    import { createWebGpuBackend } from "${WEBGPU}";
    let outcome;
    try { await createWebGpuBackend(); outcome = "adapter"; }
    catch (e) { outcome = e.name + ": " + e.message; }
    console.log(JSON.stringify({ backends: Deno.env.get("DENO_WEBGPU_BACKEND"), outcome }));`;
  const env = Deno.env.toObject();
  delete env.DENO_WEBGPU_BACKEND;
  if (backends !== undefined) env.DENO_WEBGPU_BACKEND = backends;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["eval", "--unstable-webgpu", code],
    env,
    clearEnv: true,
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert(out.success, new TextDecoder().decode(out.stderr));
  return text;
}

Deno.test("webgpu adapter: without DENO_WEBGPU_BACKEND only native backends, not OpenGL", async () => {
  const { backends } = JSON.parse(await child(undefined));
  assert.equal(backends, "vulkan,metal,dx12");
});

Deno.test("webgpu adapter: none on the backends tried is a clear error naming the package", async () => {
  if (Deno.build.os !== "linux") return; // Metal or DX12 would be found
  const { outcome } = JSON.parse(await child("metal,dx12"));
  assert.match(outcome, /^NoWebGpuAdapterError: no WebGPU adapter found on metal,dx12/);
  assert.match(outcome, /apt-get install mesa-vulkan-drivers libvulkan1/);
  assert.match(outcome, /OpenGL adapters are used only when DENO_WEBGPU_BACKEND names gl/);
});
