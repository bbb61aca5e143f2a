// The CD-MoE main job end to end on the default model (tiny calibration): results file,
// resume from the state file, condense from the results, and every bad input is a clear
// error with a non-zero exit and no partial output.

import assert from "node:assert";
import { runSearchJob, type SearchSettings } from "../lib/methods/search_job.ts";
import { condenseFromSearch } from "../lib/methods/condense_job.ts";
import { DEFAULT_CALIBRATION } from "../lib/methods/calibration.ts";
import { DEFAULT_MODEL, FIXTURE_ROOT } from "./golden.ts";

const SEARCH = new URL("../scripts/greedy_layer_search.ts", import.meta.url).pathname;
const CONDENSE = new URL("../scripts/condense.ts", import.meta.url).pathname;
const PROFILE = new URL("../scripts/profile_routing.ts", import.meta.url).pathname;

// deno-lint-ignore no-explicit-any
type Json = any;

const tiny: SearchSettings = {
  model: DEFAULT_MODEL.replace(/\/+$/, ""),
  data: DEFAULT_CALIBRATION,
  name: "tiny",
  docs: 2,
  maxLen: 12,
  profileMaxLen: null,
  profile: null,
  batchSize: 2,
  bos: "auto",
  metric: "js-hidden",
  expertMetric: "js-hidden",
  experts: 1,
  layers: 2,
  variants: ["sr", "layerdrop"],
  naive: false,
  layerwise: false,
};

Deno.test("search job: results, resume after a kill, condense from the results", async () => {
  const root = await Deno.makeTempDir();
  const logs: string[] = [];
  const opts = { resultsRoot: root, progress: false, log: (s: string) => logs.push(s) };
  const first = await runSearchJob(tiny, opts);
  const r = first.results as Record<string, Json>;
  assert.strictEqual(r.schema_version, 1);
  assert.strictEqual(r.kind, "cdmoe-search");
  assert.match(r.model.hash, /^[0-9a-f]{64}$/);
  assert.match(r.data.sha256, /^[0-9a-f]{64}$/);
  assert.strictEqual(r.data.bos.prepended, true);
  // The profile sees whole documents (up to the model's 512 positions), the searches 12
  // tokens of each.
  assert.deepStrictEqual(r.data.profile, {
    file: null,
    docs: 2,
    tokens: 1024,
    max_len: 512,
    full_length: true,
  });
  assert.strictEqual(r.data.tokens, 24);
  for (const lp of Object.values(r.profile.layers) as Json[]) assert.strictEqual(lp.tokens, 1024);
  assert.strictEqual(r.layer_search.sr.order.length, 2);
  assert.strictEqual(Object.keys(r.expert_search).length, 5);
  assert(r.layer_search.sr.steps[1].bytes < r.layer_search.sr.steps[0].bytes);

  // A killed run: state holds only the first layer-search step of layerdrop.
  const statePath = `${root}/search/tiny.state.json`;
  const state = JSON.parse(await Deno.readTextFile(statePath));
  state.variants.layerdrop.steps.length = 1;
  state.variants.layerdrop.order.length = 1;
  await Deno.writeTextFile(statePath, JSON.stringify(state));
  await Deno.remove(first.path);
  logs.length = 0;
  const second = await runSearchJob(tiny, opts);
  assert(logs.some((l) => l.startsWith("resuming")));
  const r2 = second.results as Record<string, Json>;
  for (const v of ["sr", "layerdrop"]) {
    assert.deepStrictEqual(r2.layer_search[v].order, r.layer_search[v].order);
    r2.layer_search[v].steps.forEach((s: Json, i: number) =>
      assert(Math.abs(s.divergence - r.layer_search[v].steps[i].divergence) < 1e-9)
    );
  }

  // Layer-wise weights (one layer resident at a time) give the same search.
  const lw = (await runSearchJob({ ...tiny, name: "tiny-lw", layerwise: true }, opts))
    .results as Record<string, Json>;
  assert.deepStrictEqual(lw.layer_search.sr.order, r.layer_search.sr.order);
  for (const l of Object.keys(r.expert_search)) {
    assert.deepStrictEqual(lw.expert_search[l].steps, r.expert_search[l].steps);
  }

  // Another variant resumes from the same state (profile and expert search reused).
  logs.length = 0;
  const third = (await runSearchJob({ ...tiny, variants: ["s"] }, opts)).results as Record<
    string,
    Json
  >;
  assert(logs.some((l) => l.startsWith("resuming")));
  assert.deepStrictEqual(Object.keys(third.layer_search).sort(), ["layerdrop", "s", "sr"]);

  // Different settings must not resume from this state.
  await assert.rejects(
    () => runSearchJob({ ...tiny, metric: "cosine" }, opts),
    /different settings.*refusing/,
  );

  const out = `${root}/condensed`;
  const c = await condenseFromSearch({ search: second.path, variant: "sr", layers: 2 }, out);
  assert(c.bytesAfter < c.bytesBefore);
  const cfg = JSON.parse(await Deno.readTextFile(`${out}/config.json`));
  assert.deepStrictEqual(
    Object.keys(cfg.cdmoe.layers).map(Number).sort(),
    [...c.plan.keys()].sort(),
  );
  await Deno.stat(`${out}/tokenizer.json`);
  await Deno.remove(root, { recursive: true });
});

async function run(script: string, args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    code: out.code,
    stderr: new TextDecoder().decode(out.stderr),
    stdout: new TextDecoder().decode(out.stdout),
  };
}

async function filesUnder(dir: string): Promise<string[]> {
  const found: string[] = [];
  for await (const e of Deno.readDir(dir)) {
    if (e.isDirectory) found.push(...(await filesUnder(`${dir}/${e.name}`)));
    else found.push(`${dir}/${e.name}`);
  }
  return found;
}

Deno.test("search job: a profile from profile_routing.ts, checked against model and data", async () => {
  const root = await Deno.makeTempDir();
  const opts = { resultsRoot: root, progress: false, log: () => {} };
  const file = `${root}/profile.json`;
  const p = await run(PROFILE, ["--docs", "2", "--batch-size", "2", "--out", file, "--quiet"]);
  assert.strictEqual(p.code, 0, p.stderr);
  // The same profile as the search computes itself (full-length documents by default).
  const own = (await runSearchJob({ ...tiny, variants: ["sr"] }, opts)).results as Json;
  const given = (await runSearchJob({ ...tiny, variants: ["sr"], name: "pf", profile: file }, opts))
    .results as Json;
  assert.deepStrictEqual(given.profile, own.profile);
  for (const l of Object.keys(own.expert_search)) {
    assert.deepStrictEqual(given.expert_search[l].steps, own.expert_search[l].steps);
  }
  assert.deepStrictEqual(given.data.profile, { ...own.data.profile, file });
  // A profile of another model or other text is refused, naming the file.
  const written = JSON.parse(await Deno.readTextFile(file));
  for (
    const [key, change, want] of [
      ["model", { hash: "0".repeat(64) }, /profile\.json: profile of another model .*hash differs/],
      ["data", { sha256: "0".repeat(64) }, /profile\.json: profile of other calibration text/],
    ] as const
  ) {
    await Deno.writeTextFile(
      file,
      JSON.stringify({ ...written, [key]: { ...written[key], ...change } }),
    );
    await assert.rejects(
      () => runSearchJob({ ...tiny, name: `bad-${key}`, profile: file }, opts),
      want,
    );
    await assert.rejects(() => Deno.stat(`${root}/search/bad-${key}.state.json`));
  }
  await Deno.remove(root, { recursive: true });
});

Deno.test("bad inputs: clear error, non-zero exit, no partial output", async () => {
  const root = await Deno.makeTempDir();
  const results = `${root}/results`;
  const base = ["--docs", "1", "--max-len", "8", "--results", results, "--quiet"];
  const empty = `${root}/empty.jsonl`, malformed = `${root}/bad.jsonl`;
  await Deno.writeTextFile(empty, "\n\n");
  await Deno.writeTextFile(malformed, '{"text": "fine"}\n{"text": oops}\n');
  // A model without MoE layers: deepseek fixture with n_routed_experts null.
  const dense = `${root}/dense-model`;
  await Deno.mkdir(dense);
  const cfg = JSON.parse(await Deno.readTextFile(`${FIXTURE_ROOT}deepseek-a/config.json`));
  await Deno.writeTextFile(
    `${dense}/config.json`,
    JSON.stringify({ ...cfg, n_routed_experts: null }),
  );
  await Deno.symlink(`${FIXTURE_ROOT}deepseek-a/model.safetensors`, `${dense}/model.safetensors`);

  const cases: [string, string[], RegExp][] = [
    [SEARCH, ["--metric", "kl"], /--metric: unknown metric "kl"/],
    [SEARCH, ["--expert-metric", "loss"], /--expert-metric loss/],
    [
      SEARCH,
      ["--experts", "17"],
      /--experts 17 is larger than the number of routed experts \(16\)/,
    ],
    [SEARCH, ["--layers", "6"], /--layers 6 is larger than the 5 MoE layers/],
    [SEARCH, ["--variant", "sr,foo"], /--variant: unknown value "foo"/],
    [SEARCH, ["--docs", "0"], /--docs: expected an integer >= 1/],
    [SEARCH, ["--profile-max-len", "1"], /--profile-max-len: expected "full" or an integer >= 2/],
    [SEARCH, ["--profile", `${root}/none.json`], /none\.json: cannot read/],
    [SEARCH, ["--data", empty], /empty\.jsonl: no documents/],
    [SEARCH, ["--data", malformed], /bad\.jsonl: line 2: malformed JSON/],
    [SEARCH, ["--docs", "65"], /asked for 65 documents but the file has only 64/],
    [SEARCH, ["--model", dense], /dense-model\/config\.json: the model has no MoE layers/],
    [PROFILE, ["--data", empty], /empty\.jsonl: no documents/],
  ];
  for (const [script, args, want] of cases) {
    const r = await run(script, [...base, ...args]);
    assert.notStrictEqual(r.code, 0, `${args.join(" ")}: exit code 0`);
    assert.match(r.stderr, want, `${args.join(" ")}: stderr was ${r.stderr}`);
  }
  // No partial output from any of them.
  await Deno.mkdir(results, { recursive: true });
  assert.deepStrictEqual(await filesUnder(results), []);

  // A state file from another schema version is refused, and left alone.
  await Deno.mkdir(`${results}/search`, { recursive: true });
  const state = `${results}/search/old.state.json`;
  await Deno.writeTextFile(
    state,
    JSON.stringify({ kind: "cdmoe-search-state", schema_version: 99 }),
  );
  let r = await run(SEARCH, [...base, "--name", "old"]);
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /old\.state\.json: schema_version 99 is not supported/);
  assert.deepStrictEqual(await filesUnder(results), [state]);

  // condense: a results file of the wrong schema / kind, and a missing flag.
  const old = `${root}/old-search.json`;
  await Deno.writeTextFile(old, JSON.stringify({ kind: "cdmoe-search", schema_version: 0 }));
  r = await run(CONDENSE, ["--search", old, "--layers", "1", "--out", `${root}/o`]);
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /old-search\.json: schema_version 0 is not supported/);
  r = await run(CONDENSE, ["--search", state, "--layers", "1", "--out", `${root}/o`]);
  assert.match(r.stderr, /is a "cdmoe-search-state" file, expected "cdmoe-search"/);
  r = await run(CONDENSE, ["--layers", "1", "--out", `${root}/o`]);
  assert.match(r.stderr, /--search is required/);
  await assert.rejects(() => Deno.stat(`${root}/o`));
  await Deno.remove(root, { recursive: true });
});

Deno.test("every script has --help", async () => {
  for (const script of [SEARCH, CONDENSE, PROFILE]) {
    const r = await run(script, ["--help"]);
    assert.strictEqual(r.code, 0);
    assert.match(r.stdout, /Usage:/);
  }
});
