// Bad input: clear message naming file, line and field; non-zero exit; no results written.

import assert from "node:assert";

const SCRIPT = new URL("../scripts/eval_lm_harness.ts", import.meta.url).pathname;

async function run(dir: string, tasks: string) {
  const out = `${dir}/out/results.json`;
  const p = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", SCRIPT, "--tasks", tasks, "--data-dir", dir, "--output", out],
    stdout: "piped",
    stderr: "piped",
  }).output();
  let wrote = true;
  try {
    await Deno.stat(`${dir}/out`);
  } catch {
    wrote = false;
  }
  return { code: p.code, stderr: new TextDecoder().decode(p.stderr), wrote };
}

async function task(dir: string, name: string, lines: string[]) {
  await Deno.mkdir(`${dir}/${name}`, { recursive: true });
  await Deno.writeTextFile(
    `${dir}/${name}/${name.startsWith("sotu") ? "test" : "validation"}.jsonl`,
    lines.join("\n"),
  );
}

const good = JSON.stringify({ goal: "g", sol1: "a", sol2: "b", label: 0 });

Deno.test("unknown task", async () => {
  const dir = await Deno.makeTempDir();
  const r = await run(dir, "piqa,not_a_task");
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /unknown task "not_a_task"/);
  assert.ok(!r.wrote);
});

Deno.test("missing data file names the folders searched", async () => {
  const dir = await Deno.makeTempDir();
  const r = await run(dir, "boolq");
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /task boolq: no "validation" split found/);
  assert.ok(!r.wrote);
});

Deno.test("missing field names file, line and field", async () => {
  const dir = await Deno.makeTempDir();
  await task(dir, "piqa", [good, JSON.stringify({ goal: "g", sol1: "a", label: 1 })]);
  const r = await run(dir, "piqa");
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /piqa\/validation\.jsonl:2: missing field "sol2" required by task piqa/);
  assert.ok(!r.wrote);
});

Deno.test("invalid JSON line", async () => {
  const dir = await Deno.makeTempDir();
  await task(dir, "piqa", [good, "{not json"]);
  const r = await run(dir, "piqa");
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /validation\.jsonl:2: invalid JSON/);
});

Deno.test("empty choice list", async () => {
  const dir = await Deno.makeTempDir();
  await task(dir, "sotu_cloze", [JSON.stringify({ query: "q", choices: [], gold: 0 })]);
  const r = await run(dir, "sotu_cloze");
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /sotu_cloze\/test\.jsonl:1: task sotu_cloze: empty choice list/);
  assert.ok(!r.wrote);
});

Deno.test("gold index out of range (also an ARC answerKey not among the labels)", async () => {
  const dir = await Deno.makeTempDir();
  await task(dir, "sotu_cloze", [JSON.stringify({ query: "q", choices: ["a", "b"], gold: 2 })]);
  const r = await run(dir, "sotu_cloze");
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /test\.jsonl:1: task sotu_cloze: gold index 2 out of range for 2 choices/);
  await Deno.mkdir(`${dir}/arc_easy`);
  await Deno.writeTextFile(
    `${dir}/arc_easy/test.jsonl`,
    JSON.stringify({ question: "q", choices: { text: ["a"], label: ["A"] }, answerKey: "E" }),
  );
  const arc = await run(dir, "arc_easy");
  assert.notStrictEqual(arc.code, 0);
  assert.match(arc.stderr, /gold index -1 out of range/);
  assert.ok(!arc.wrote);
});

Deno.test("a field of the wrong type", async () => {
  const dir = await Deno.makeTempDir();
  await task(dir, "piqa", [JSON.stringify({ goal: 3, sol1: "a", sol2: "b", label: 0 })]);
  const r = await run(dir, "piqa");
  assert.notStrictEqual(r.code, 0);
  assert.match(r.stderr, /validation\.jsonl:1: field "goal" of task piqa should be string/);
});

Deno.test("a bad --limit fails clearly", async () => {
  const dir = await Deno.makeTempDir();
  await task(dir, "piqa", [good]);
  const p = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", SCRIPT, "--tasks", "piqa", "--data-dir", dir, "--limit=-3"],
    stderr: "piped",
    stdout: "piped",
  }).output();
  assert.notStrictEqual(p.code, 0);
  assert.match(new TextDecoder().decode(p.stderr), /--limit must be a positive number/);
});
