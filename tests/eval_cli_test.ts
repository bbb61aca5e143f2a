// The eval script end to end on the default model: the BOS default of the harness version
// we match (v0.4.9.1: none) and --add-bos, and the results file the harness's readers get.

import assert from "node:assert";

const SCRIPT = new URL("../scripts/eval_lm_harness.ts", import.meta.url).pathname;

async function evaluate(extra: string[]) {
  const dir = await Deno.makeTempDir();
  const p = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      SCRIPT,
      ...["--tasks", "sotu_cloze", "--limit", "3", "--log-samples", "--output", `${dir}/r.json`],
      ...extra,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.strictEqual(p.code, 0, new TextDecoder().decode(p.stderr));
  const text = await Deno.readTextFile(`${dir}/r.json`);
  const samplesFile = [...Deno.readDirSync(dir)].find((e) => e.name.startsWith("samples_"))!;
  const samples = (await Deno.readTextFile(`${dir}/${samplesFile.name}`)).trim().split("\n")
    .map((l) => JSON.parse(l));
  return { text, results: JSON.parse(text), samples };
}

Deno.test("eval CLI: no BOS by default (harness v0.4.9.1), --add-bos adds it; harness keys", async () => {
  const plain = await evaluate([]);
  const bos = await evaluate(["--add-bos"]);
  assert.match(plain.results.config.model_args, /,add_bos_token=false$/);
  assert.match(bos.results.config.model_args, /,add_bos_token=true$/);
  // BOS before every context changes every score.
  const lls = (r: typeof plain) =>
    r.samples.flatMap((s) => s.resps.map((x: number[][]) => x[0][0]));
  assert.strictEqual(lls(plain).length, 6);
  lls(plain).forEach((ll, i) => assert.ok(Math.abs(ll - lls(bos)[i]) > 1e-3, `${i}`));

  const r = plain.results;
  assert.strictEqual(r.lm_eval_version_matched, "0.4.9.1");
  assert.deepStrictEqual(r.tokenizer_pad_token, ["<|pad|>", "258"]);
  assert.deepStrictEqual(r.tokenizer_bos_token, ["<|bos|>", "256"]);
  assert.deepStrictEqual(r.tokenizer_eos_token, ["<|eos|>", "257"]);
  assert.strictEqual(r.eot_token_id, 257);
  assert.strictEqual(r.max_length, 512);
  assert.ok(r.model_name.endsWith("data/models/tiny-deepseek-moe"));
  assert.strictEqual(r.config.bootstrap_iters, 100000);
  assert.ok(r.end_time > r.start_time);
  assert.strictEqual(r.total_evaluation_time_seconds, String(r.end_time - r.start_time));
  assert.match(plain.text, /"limit": 3\.0,/);
  assert.match(plain.text, /"sotu_cloze": 1\.0\n/);
});
