// scripts/forward.ts as a user runs it: the parity contract and its bad-input behaviour.
import assert from "node:assert";
import { i32Tensor, SafetensorsFile, toFloat32, writeSafetensors } from "../lib/io/safetensors.ts";
import { FIXTURE_ROOT } from "./golden.ts";
import { maxRelError } from "./util.ts";

const script = new URL("../scripts/forward.ts", import.meta.url).pathname;

async function run(...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

Deno.test("forward CLI writes the reference logits", async () => {
  const dir = `${FIXTURE_ROOT}qwen2_moe-bf16`, out = `${await Deno.makeTempDir()}/out.safetensors`;
  const r = await run(
    "--model",
    dir,
    "--input",
    `${dir}/golden.safetensors`,
    "--out",
    out,
    "--all",
  );
  assert.equal(r.code, 0, r.stderr);
  const got = await SafetensorsFile.open(out),
    want = await SafetensorsFile.open(`${dir}/golden.safetensors`);
  assert.deepEqual(got.info("logits").shape, [2, 12, 256]);
  assert(
    maxRelError(toFloat32(await got.read("logits")), toFloat32(await want.read("logits"))) < 1e-4,
  );
  assert(
    maxRelError(
      toFloat32(await got.read("router_logits_1")),
      toFloat32(await want.read("router_logits_1")),
    ) < 1e-4,
  );
  got.close(), want.close();
});

Deno.test("forward CLI: bad input gives one clear line, exit 1, and no output file", async () => {
  const tmp = await Deno.makeTempDir(), out = `${tmp}/out.safetensors`;
  const model = `${FIXTURE_ROOT}olmoe-a`;
  await writeSafetensors(`${tmp}/ids.safetensors`, [
    i32Tensor("input_ids", [1, 3], new Int32Array([1, 999, 2])),
  ]);
  await writeSafetensors(`${tmp}/noids.safetensors`, [
    i32Tensor("tokens", [1, 3], new Int32Array([1, 2, 3])),
  ]);
  for (
    const [args, pattern] of [
      [
        ["--model", model, "--input", `${tmp}/ids.safetensors`, "--out", out],
        /token id 999 outside the vocabulary \[0, 256\)/,
      ],
      [
        ["--model", model, "--input", `${tmp}/noids.safetensors`, "--out", out],
        /noids\.safetensors: no tensor "input_ids"/,
      ],
      [
        ["--model", `${tmp}/nothing`, "--input", `${tmp}/ids.safetensors`, "--out", out],
        /nothing\/config\.json: cannot read/,
      ],
      [
        ["--model", model, "--input", `${tmp}/ids.safetensors`],
        /--model, --input and --out are required/,
      ],
      [["--model", model, "--bogus"], /Unknown option '--bogus'/],
      [
        ["--model", model, "--input", `${tmp}/ids.safetensors`, "--out", out, "--backend", "tpu"],
        /unknown backend "tpu"/,
      ],
    ] as const
  ) {
    const r = await run(...args);
    assert.equal(r.code, 1, `${args.join(" ")}: exit ${r.code}`);
    assert.match(r.stderr, /^error: /);
    assert.match(r.stderr, pattern);
    assert.doesNotMatch(r.stderr, /^\s+at /m, "no stack trace for user errors");
  }
  assert.deepEqual([...Deno.readDirSync(tmp)].map((e) => e.name).sort(), [
    "ids.safetensors",
    "noids.safetensors",
  ]);
});
