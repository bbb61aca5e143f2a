// Task layouts (JSON lines and Parquet as downloaded from the hub), doc_to_text / choices /
// gold per task, few-shot sampling, aggregation and the results shape, all with a fake LM.

import assert from "node:assert";
import { parquetWriteBuffer } from "hyparquet-writer";
import {
  buildResults,
  formatTable,
  loadTask,
  resolveTasks,
  scoreTasks,
} from "../lib/eval/evaluator.ts";
import type { LanguageModel, LoglikelihoodRequest } from "../lib/eval/lm.ts";
import { MMLU_CATEGORIES } from "../lib/eval/tasks.ts";

/** Scores a request by a rule; records every request it saw. */
class FakeLM implements LanguageModel {
  maxLength = 2048;
  seen: LoglikelihoodRequest[] = [];
  constructor(readonly score: (r: LoglikelihoodRequest) => number) {}
  loglikelihood(reqs: LoglikelihoodRequest[]) {
    this.seen.push(...reqs);
    return Promise.resolve(
      reqs.map((r) => ({ logprob: this.score(r), isGreedy: false, truncated: false })),
    );
  }
  loglikelihoodRolling(texts: string[]) {
    return Promise.resolve(texts.map((t) => -t.length));
  }
  generateUntil() {
    return Promise.resolve([]);
  }
}

async function write(path: string, content: string | ArrayBuffer) {
  await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
  if (typeof content === "string") await Deno.writeTextFile(path, content);
  else await Deno.writeFile(path, new Uint8Array(content));
}
const jsonl = (rows: unknown[]) => rows.map((r) => JSON.stringify(r)).join("\n") + "\n";
// deno-lint-ignore no-explicit-any
const parquet = (rows: Record<string, any>[], types: Record<string, "INT64"> = {}) =>
  parquetWriteBuffer({
    columnData: Object.keys(rows[0]).map((name) => ({
      name,
      data: rows.map((r) => r[name]),
      ...(types[name] ? { type: types[name] } : {}),
    })),
  });

const arcDoc = {
  id: "q1",
  question: "Which is a gas?",
  choices: { text: ["rock", "steam", "ice"], label: ["A", "B", "C"] },
  answerKey: "B",
};

Deno.test("every harness task loads from its hub layout and builds the harness's requests", async () => {
  const dir = await Deno.makeTempDir();
  await write(`${dir}/allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet`, parquet([arcDoc]));
  await write(`${dir}/ai2_arc/ARC-Challenge/test.jsonl`, jsonl([{ ...arcDoc, answerKey: "C" }]));
  await write(
    `${dir}/super_glue/boolq/validation-00000-of-00001.parquet`,
    parquet([{ question: "is water wet", passage: "Water is wet.", idx: 0n, label: 1n }], {
      idx: "INT64",
      label: "INT64",
    }),
  );
  await write(
    `${dir}/hellaswag/data/validation-00000-of-00001.parquet`,
    parquet([{
      activity_label: "Baking",
      ctx_a: "A man mixes flour.",
      ctx_b: "then HE",
      endings: ["bakes it [step] well.", "eats  it."],
      label: "1",
    }]),
  );
  await write(
    `${dir}/piqa/validation.jsonl`,
    jsonl([{ goal: "open a jar", sol1: "twist", sol2: "bite", label: 0 }]),
  );
  await write(
    `${dir}/allenai/winogrande/winogrande_xl/validation.parquet`,
    parquet([{
      sentence: "The cup fell off the table because _ was tilted.",
      option1: "the cup",
      option2: "the table",
      answer: "2",
    }]),
  );
  await write(
    `${dir}/openbookqa/main/test.jsonl`,
    jsonl([{
      id: "7",
      question_stem: "The sun is a",
      choices: { text: ["star", "planet"], label: ["A", "B"] },
      answerKey: " A",
    }]),
  );
  await write(
    `${dir}/rte/validation.json`,
    jsonl([{ sentence1: "A dog runs.", sentence2: "An animal moves.", label: 0, idx: 0 }]),
  );
  await write(
    `${dir}/cais/mmlu/abstract_algebra/test-00000-of-00001.parquet`,
    parquet([{
      question: " What is 1+1? ",
      subject: "abstract_algebra",
      choices: ["1", "2", "3", "4"],
      answer: 1n,
    }], {
      answer: "INT64",
    }),
  );

  const names = [
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "piqa",
    "winogrande",
    "openbookqa",
    "rte",
    "mmlu_abstract_algebra",
  ];
  const tasks = [];
  for (const n of names) tasks.push(await loadTask(n, dir, null, 0));
  const lm = new FakeLM((r) => -r.continuation.length);
  const scored = await scoreTasks(lm, tasks, 0);
  const reqs = (ctx: string, conts: string[]) =>
    conts.map((c) => ({ context: ctx, continuation: c }));
  assert.deepStrictEqual(lm.seen, [
    ...reqs("Question: Which is a gas?\nAnswer:", [" rock", " steam", " ice"]),
    ...reqs("Question: Which is a gas?\nAnswer:", [" rock", " steam", " ice"]),
    ...reqs("Water is wet.\nQuestion: is water wet?\nAnswer:", [" no", " yes"]),
    ...reqs("Baking: A man mixes flour. Then he", [" bakes it well.", " eats it."]),
    ...reqs("Question: open a jar\nAnswer:", [" twist", " bite"]),
    { context: "The cup fell off the table because the cup", continuation: " was tilted." },
    { context: "The cup fell off the table because the table", continuation: " was tilted." },
    ...reqs("The sun is a", [" star", " planet"]),
    ...reqs("A dog runs.\nQuestion: An animal moves. True or False?\nAnswer:", [" True", " False"]),
    ...reqs(
      "The following are multiple choice questions (with answers) about abstract algebra.\n\n" +
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:",
      [" A", " B", " C", " D"],
    ),
  ]);
  // Shortest continuation wins under this fake: check gold handling per task.
  const acc = (n: string) => scored.get(n)!.metrics.acc;
  assert.strictEqual(acc("arc_easy"), 0); // picks "ice"/"rock" (shortest), gold steam
  assert.strictEqual(acc("arc_challenge"), 1); // gold C is "ice", the shortest
  // acc_norm: -5/4, -6/5, -4/3 per character -> "steam" (gold)
  assert.strictEqual(scored.get("arc_easy")!.metrics.acc_norm, 1);
  assert.strictEqual(acc("boolq"), 0); // " no" shorter, gold yes
  assert.strictEqual(acc("hellaswag"), 1); // " eats it." shorter, gold 1
  assert.strictEqual(acc("piqa"), 0); // " bite" is shorter, gold 0
  assert.strictEqual(acc("winogrande"), 0); // equal scores: first max (0), gold option2 (1)
  assert.strictEqual(acc("openbookqa"), 1);
  assert.strictEqual(acc("rte"), 1); // " True" shorter, gold 0
  assert.strictEqual(acc("mmlu_abstract_algebra"), 0);
});

Deno.test("winogrande scores the shared continuation under each option's context", async () => {
  const dir = await Deno.makeTempDir();
  await write(
    `${dir}/winogrande/validation.jsonl`,
    jsonl([{ sentence: "A _ b.", option1: "x", option2: "y", answer: "1" }]),
  );
  const task = await loadTask("winogrande", dir, null, 0);
  const lm = new FakeLM((r) => (r.context.endsWith("y") ? -1 : -2));
  const scored = await scoreTasks(lm, [task], 0);
  assert.deepStrictEqual(lm.seen.map((r) => r.context), ["A x", "A y"]);
  assert.strictEqual(scored.get("winogrande")!.metrics.acc, 0);
});

Deno.test("results: hand-computed acc/acc_norm/stderr, harness keys and table", async () => {
  const dir = await Deno.makeTempDir();
  // lls come from the continuation: a=-1, bbb=-2, cc=-3, d=-4, e=-5, f=-1 (see requests test)
  const ll: Record<string, number> = {
    " a": -1,
    " bbb": -2,
    " cc": -3,
    " d": -4,
    " e": -5,
    " f": -1,
  };
  await write(
    `${dir}/sotu_cloze/test.jsonl`,
    jsonl([
      { query: "q1", choices: ["a", "bbb"], gold: 1 },
      { query: "q2", choices: ["cc", "d"], gold: 0 },
      { query: "q3", choices: ["e", "f"], gold: 0 },
    ]),
  );
  const task = await loadTask("sotu_cloze", dir, null, 0);
  const scored = await scoreTasks(new FakeLM((r) => ll[r.continuation]), [task], 0);
  const res = buildResults(
    {
      model: "m",
      modelArgs: "",
      batchSize: 1,
      device: "cpu",
      limit: null,
      numFewshot: 0,
      requested: ["sotu_cloze"],
    },
    [task],
    scored,
    { gitHash: null, startTime: 0, seconds: 1 },
  );
  // deno-lint-ignore no-explicit-any
  const r = (res.results as any).sotu_cloze;
  assert.ok(Math.abs(r["acc,none"] - 1 / 3) < 1e-12);
  assert.ok(Math.abs(r["acc_norm,none"] - 2 / 3) < 1e-12);
  assert.ok(Math.abs(r["acc_stderr,none"] - 1 / 3) < 1e-12);
  assert.ok(Math.abs(r["acc_norm_stderr,none"] - 1 / 3) < 1e-12);
  assert.strictEqual(r.alias, "sotu_cloze");
  for (
    const k of [
      "groups",
      "group_subtasks",
      "configs",
      "versions",
      "n-shot",
      "higher_is_better",
      "n-samples",
      "config",
      "git_hash",
      "date",
      "total_evaluation_time_seconds",
    ]
  ) {
    assert.ok(k in res, k);
  }
  assert.deepStrictEqual((res["n-samples"] as Record<string, unknown>).sotu_cloze, {
    original: 3,
    effective: 3,
  });
  const table = formatTable(res);
  assert.match(table, /\|sotu_cloze\|\s+1\|none\s*\|\s+0\|acc\s*\|↑\|0\.3333\|±\|0\.3333\|/);
});

Deno.test("mmlu: 57 subjects, groups weighted by size, first-n few-shot from dev", async () => {
  const dir = await Deno.makeTempDir();
  const subjects = Object.values(MMLU_CATEGORIES).flat();
  assert.strictEqual(subjects.length, 57);
  let total = 0, correct = 0;
  for (const [i, s] of subjects.entries()) {
    // Sizes 1..3; the fake LM always answers "B"; gold B for some docs.
    const docs = Array.from(
      { length: 1 + (i % 3) },
      (_, j) => ({ question: `${s} ${j}`, choices: ["w", "x", "y", "z"], answer: (i + j) % 2 }),
    );
    total += docs.length, correct += docs.filter((d) => d.answer === 1).length;
    await write(`${dir}/mmlu/${s}/test.jsonl`, jsonl(docs));
    await write(
      `${dir}/mmlu/${s}/dev.jsonl`,
      jsonl(
        [0, 1, 2].map((k) => ({ question: `dev${k}`, choices: ["a", "b", "c", "d"], answer: k })),
      ),
    );
  }
  const names = resolveTasks(["mmlu"]);
  assert.strictEqual(names.length, 57);
  const tasks = [];
  for (const n of names) tasks.push(await loadTask(n, dir, null, 2));
  const lm = new FakeLM((r) => (r.continuation === " B" ? -1 : -2));
  const scored = await scoreTasks(lm, tasks, 2);
  assert.ok(lm.seen[0].context.startsWith(
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n" +
      "dev0\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\ndev1\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\nabstract_algebra 0\n",
  ));
  const res = buildResults(
    {
      model: "m",
      modelArgs: "",
      batchSize: 1,
      device: "cpu",
      limit: null,
      numFewshot: 2,
      requested: ["mmlu"],
    },
    tasks,
    scored,
    { gitHash: null, startTime: 0, seconds: 1 },
  );
  // deno-lint-ignore no-explicit-any
  const r = res.results as any, g = res.groups as any;
  assert.ok(Math.abs(r.mmlu["acc,none"] - correct / total) < 1e-12);
  assert.strictEqual(g.mmlu_stem.alias, " - stem");
  assert.strictEqual(r.mmlu_abstract_algebra.alias, "  - abstract_algebra");
  assert.strictEqual((res.group_subtasks as Record<string, string[]>).mmlu.length, 4);
  assert.ok(Object.keys(r).indexOf("mmlu_stem") < Object.keys(r).indexOf("mmlu_abstract_algebra"));
});

Deno.test("few-shot: default sampler draws like random.Random(1234).sample", async () => {
  const dir = await Deno.makeTempDir();
  await write(
    `${dir}/piqa/validation.jsonl`,
    jsonl([{ goal: "G", sol1: "s1", sol2: "s2", label: 0 }]),
  );
  await write(
    `${dir}/piqa/train.jsonl`,
    jsonl(
      Array.from(
        { length: 10 },
        (_, k) => ({ goal: `g${k}`, sol1: `a${k}`, sol2: `b${k}`, label: k % 2 }),
      ),
    ),
  );
  const task = await loadTask("piqa", dir, null, 3);
  const lm = new FakeLM(() => -1);
  await scoreTasks(lm, [task], 3);
  // random.Random(1234).sample(range(10), 3) == [7, 1, 0]
  assert.strictEqual(
    lm.seen[0].context,
    "Question: g7\nAnswer: b7\n\nQuestion: g1\nAnswer: b1\n\nQuestion: g0\nAnswer: a0\n\nQuestion: G\nAnswer:",
  );
});

Deno.test("--limit takes the first docs (a fraction < 1 takes a share)", async () => {
  const dir = await Deno.makeTempDir();
  await write(
    `${dir}/piqa/validation.jsonl`,
    jsonl(Array.from({ length: 10 }, () => ({ goal: "g", sol1: "a", sol2: "b", label: 0 }))),
  );
  assert.strictEqual((await loadTask("piqa", dir, 4, 0)).docs.length, 4);
  assert.strictEqual((await loadTask("piqa", dir, 0.25, 0)).docs.length, 3);
  assert.strictEqual((await loadTask("piqa", dir, 4, 0)).originalSize, 10);
});

Deno.test("shipped tasks load from data/tasks", async () => {
  for (
    const n of ["sotu_cloze", "sotu_word_order", "mobydick_cloze", "sotu_ppl", "mobydick_ppl"]
  ) {
    const t = await loadTask(n, "/nonexistent", null, 0);
    assert.ok(t.docs.length >= 16, n);
  }
});
