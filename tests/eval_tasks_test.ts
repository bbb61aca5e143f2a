// Task layouts (JSON lines and Parquet as downloaded from the hub), doc_to_text / choices /
// gold per task, few-shot sampling, aggregation and the results shape, all with a fake LM.

import assert from "node:assert";
import { parquetWriteBuffer } from "hyparquet-writer";
import {
  buildResults,
  formatTable,
  harnessJson,
  harnessTokenizerInfo,
  loadTask,
  resolveTasks,
  scoreTasks,
} from "../lib/eval/evaluator.ts";
import { pyFloatRepr, pyJsonDumps } from "../lib/eval/pyjson.ts";
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

const RUN = { gitHash: null, date: 0, startTime: 10, endTime: 11.5 };

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
    RUN,
  );
  // deno-lint-ignore no-explicit-any
  const r = (res.results as any).sotu_cloze;
  assert.ok(Math.abs(r["acc,none"] - 1 / 3) < 1e-12);
  assert.ok(Math.abs(r["acc_norm,none"] - 2 / 3) < 1e-12);
  assert.ok(Math.abs(r["acc_stderr,none"] - 1 / 3) < 1e-12);
  assert.ok(Math.abs(r["acc_norm_stderr,none"] - 1 / 3) < 1e-12);
  assert.strictEqual(r.alias, "sotu_cloze");
  assert.ok(!("groups" in res)); // the harness writes "groups" only when a group ran
  for (
    const k of [
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
  // make_table writes n-shot on every metric row, the name and version only on the first.
  assert.match(table, /\|\s+\|\s+\|none\s*\|\s+0\|acc_norm\s*\|↑\|0\.6667\|±\|0\.3333\|/);
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
    RUN,
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

// The sequences below are CPython 3.11's, for the harness's exact calls: one
// random.Random(1234) per task, then rnd.sample(fewshot_docs, k) once per eval doc in order:
//   r = random.Random(1234); [r.sample(range(30), 4) for _ in range(5)]
const PY_30_DRAW_4 = [[24, 14, 3, 0], [2, 29, 25, 18], [1, 21, 22, 2], [3, 24, 11, 7], [
  0,
  25,
  11,
  20,
]];
//   r = random.Random(1234); [r.sample(range(8), 3) for _ in range(3)]
const PY_8_DRAW_3 = [[7, 0, 6], [1, 6, 4], [0, 5, 6]];
//   r = random.Random(1234); [r.sample(range(8), 2) for _ in range(3)]
const PY_8_DRAW_2 = [[7, 0], [0, 7], [0, 5]];

/** Few-shot example markers m<k>x in the order they appear in a context. */
const markers = (context: string) => [...context.matchAll(/m(\d+)x/g)].map((m) => Number(m[1]));

Deno.test("few-shot: unset splits draw n + 1 per doc from one Random(1234) and drop the eval doc", async () => {
  // piqa's YAML sets neither test_split nor fewshot_split (None == None), so the harness
  // draws 4 for 3-shot, then removes the doc being evaluated, then keeps the first 3.
  const dir = await Deno.makeTempDir();
  const train = Array.from(
    { length: 30 },
    (_, k) => ({ goal: `m${k}x`, sol1: `a${k}`, sol2: `b${k}`, label: k % 2 }),
  );
  const validation = Array.from(
    { length: 5 },
    (_, i) => ({ goal: `G${i}`, sol1: "s1", sol2: "s2", label: 0 }),
  );
  // Doc 3 is also train doc 24 (key order differs: Python's == ignores it), drawn for doc 3
  // in first place, so its examples are 3, 11 and the extra draw 7.
  validation[3] = { label: 0, sol2: "b24", sol1: "a24", goal: "m24x" };
  await write(`${dir}/piqa/train.jsonl`, jsonl(train));
  await write(`${dir}/piqa/validation.jsonl`, jsonl(validation));
  const task = await loadTask("piqa", dir, null, 3);
  const lm = new FakeLM(() => -1);
  await scoreTasks(lm, [task], 3);
  const contexts = lm.seen.filter((_, j) => j % 2 === 0).map((r) => r.context);
  const examples = contexts.map((c) => markers(c.slice(0, c.lastIndexOf("Question:"))));
  assert.deepStrictEqual(examples, [[24, 14, 3], [2, 29, 25], [1, 21, 22], [3, 11, 7], [
    0,
    25,
    11,
  ]]);
  assert.deepStrictEqual(
    examples,
    PY_30_DRAW_4.map((d, i) => d.filter((k) => !(i === 3 && k === 24)).slice(0, 3)),
  );
  assert.strictEqual(
    contexts[1],
    "Question: m2x\nAnswer: a2\n\nQuestion: m29x\nAnswer: b29\n\nQuestion: m25x\nAnswer: b25\n\n" +
      "Question: G1\nAnswer:",
  );
});

Deno.test("few-shot: boolq, hellaswag, piqa, winogrande, rte draw n + 1; arc, openbookqa draw n", async () => {
  const dir = await Deno.makeTempDir();
  // Each maker builds few-shot doc k (marked m<k>x) or, with k < 0, an unmarked eval doc.
  const tag = (k: number) => (k < 0 ? "E" : `m${k}x`);
  const arcLike = (field: string) => (k: number) => ({
    [field]: tag(k),
    choices: { text: ["c0", "c1"], label: ["A", "B"] },
    answerKey: "A",
  });
  const makers: Record<string, [string, (k: number) => Record<string, unknown>]> = {
    boolq: ["validation", (k) => ({ passage: tag(k), question: "q", label: 1 })],
    hellaswag: ["validation", (k) => ({
      activity_label: tag(k),
      ctx_a: "a.",
      ctx_b: "b",
      endings: ["e0", "e1"],
      label: "0",
    })],
    piqa: ["validation", (k) => ({ goal: tag(k), sol1: "s1", sol2: "s2", label: 1 })],
    winogrande: ["validation", (k) => ({
      sentence: `${tag(k)} _ y.`,
      option1: "o1",
      option2: "o2",
      answer: "2",
    })],
    rte: ["validation", (k) => ({ sentence1: tag(k), sentence2: "s", label: 0 })],
    arc_easy: ["test", arcLike("question")],
    openbookqa: ["test", arcLike("question_stem")],
  };
  const tasks = [];
  for (const [name, [split, make]] of Object.entries(makers)) {
    const folder = name === "arc_easy" ? "allenai/ai2_arc/ARC-Easy" : name;
    await write(
      `${dir}/${folder}/train.jsonl`,
      jsonl(Array.from({ length: 8 }, (_, k) => make(k))),
    );
    await write(`${dir}/${folder}/${split}.jsonl`, jsonl([make(-1), make(-1), make(-1)]));
    tasks.push(await loadTask(name, dir, null, 2));
  }
  const lm = new FakeLM(() => -1);
  await scoreTasks(lm, tasks, 2);
  for (const [t, task] of tasks.entries()) {
    const name = task.def.name;
    // One context per doc (the first choice's; winogrande's contexts share the prefix).
    const seen = lm.seen.slice(t * 6, t * 6 + 6).filter((_, j) => j % 2 === 0);
    const got = seen.map((r) => markers(r.context));
    const extra = !["arc_easy", "openbookqa"].includes(name);
    const want = extra ? PY_8_DRAW_3.map((d) => d.slice(0, 2)) : PY_8_DRAW_2;
    assert.deepStrictEqual(got, want, name);
  }
});

Deno.test("few-shot: a split too small for the n + 1 draw is refused before scoring", async () => {
  const dir = await Deno.makeTempDir();
  const doc = (k: number) => ({ goal: `g${k}`, sol1: "a", sol2: "b", label: 0 });
  await write(`${dir}/piqa/train.jsonl`, jsonl([doc(0), doc(1), doc(2)]));
  await write(`${dir}/piqa/validation.jsonl`, jsonl([doc(9)]));
  await loadTask("piqa", dir, null, 2);
  await assert.rejects(
    () => loadTask("piqa", dir, null, 3),
    /task piqa: --num-fewshot 3 draws 4 examples but the train split has 3 docs/,
  );
});

/** MMLU data: subject i has size(i) docs; the fake LM (always "B") is right where answer is 1. */
async function mmluDir(
  size: (i: number) => number,
  answer = (i: number, j: number): number => ((i * 7 + j * j) % 5 < 2 ? 1 : 0),
) {
  const dir = await Deno.makeTempDir();
  const right: number[][] = [];
  for (const [i, s] of Object.values(MMLU_CATEGORIES).flat().entries()) {
    const answers = Array.from({ length: size(i) }, (_, j) => answer(i, j));
    right.push(answers.map((a) => (a === 1 ? 1 : 0)));
    const docs = answers.map((answer, j) => ({
      question: `${s} ${j}`,
      choices: ["w", "x", "y", "z"],
      answer,
    }));
    await write(`${dir}/mmlu/${s}/test.jsonl`, jsonl(docs));
  }
  return { dir, right };
}

async function runMmlu(dir: string, requested: string[]) {
  const tasks = [];
  for (const n of resolveTasks(requested)) tasks.push(await loadTask(n, dir, null, 0));
  const scored = await scoreTasks(new FakeLM((r) => (r.continuation === " B" ? -1 : -2)), tasks, 0);
  const cfg = {
    model: "m",
    modelArgs: "pretrained=x",
    batchSize: 1,
    device: "cpu",
    limit: null,
    numFewshot: 0,
  };
  return buildResults({ ...cfg, requested }, tasks, scored, RUN);
}

Deno.test("mmlu group stderr: pooled_sample_stderr over the 57 subjects, not over its 4 groups", async () => {
  // STEM (the first 19 subjects): 2 docs each, half right; the rest 6 docs, one right. The
  // groups then differ in variance and size, so nested pooling is 4% off the flat one.
  const { dir, right } = await mmluDir(
    (i) => (i < 19 ? 2 : 6),
    (i, j) => (i < 19 ? j % 2 : j === 0 ? 1 : 0),
  );
  const res = await runMmlu(dir, ["mmlu"]);
  // deno-lint-ignore no-explicit-any
  const r = res.results as any;
  // Independently: pooled variance = within-subject sum of squares / (N - 57), stderr = sqrt(var / N).
  const pooled = (subjects: number[][]) => {
    let ss = 0, n = 0;
    for (const xs of subjects) {
      const mu = xs.reduce((a, b) => a + b, 0) / xs.length;
      for (const x of xs) ss += (x - mu) ** 2;
      n += xs.length;
    }
    return Math.sqrt(ss / (n - subjects.length) / n);
  };
  const want = pooled(right);
  assert.ok(
    Math.abs(r.mmlu["acc_stderr,none"] - want) < 1e-12 * want,
    `${r.mmlu["acc_stderr,none"]} vs ${want}`,
  );
  // Pooling the four group stderrs instead gives another number on this data.
  const cats = Object.keys(MMLU_CATEGORIES).map((c) => r[`mmlu_${c}`]);
  const catSizes = Object.values(MMLU_CATEGORIES).map((subs) =>
    subs.reduce((a, s) => a + right[Object.values(MMLU_CATEGORIES).flat().indexOf(s)].length, 0)
  );
  let num = 0;
  cats.forEach((c, k) => (num += (catSizes[k] - 1) * c["acc_stderr,none"] ** 2 * catSizes[k]));
  const total = catSizes.reduce((a, b) => a + b, 0);
  assert.ok(Math.abs(Math.sqrt(num / (total - 4) / total) / want - 1) > 1e-2);
  // Each category pools over its own subjects.
  const flat = Object.values(MMLU_CATEGORIES).flat();
  for (const [c, subs] of Object.entries(MMLU_CATEGORIES)) {
    const w = pooled(subs.map((s) => right[flat.indexOf(s)]));
    assert.ok(Math.abs(r[`mmlu_${c}`]["acc_stderr,none"] - w) < 1e-12 * w, c);
  }
});

Deno.test("results: aliases, order and versions as the harness writes them", async () => {
  const { dir } = await mmluDir((i) => 2 + (i % 3));
  const res = await runMmlu(dir, ["mmlu"]);
  // deno-lint-ignore no-explicit-any
  const r = res.results as any, g = res.groups as any;
  assert.strictEqual(r.mmlu_social_sciences.alias, " - social sciences");
  assert.strictEqual(g.mmlu_social_sciences.alias, " - social sciences");
  assert.strictEqual(r.mmlu_econometrics.alias, "  - econometrics");
  // prepare_print_tasks sorts names at each level.
  const keys = Object.keys(r);
  assert.deepStrictEqual(keys.slice(0, 3), ["mmlu", "mmlu_humanities", "mmlu_formal_logic"]);
  assert.deepStrictEqual(Object.keys(g), [
    "mmlu",
    "mmlu_humanities",
    "mmlu_other",
    "mmlu_social_sciences",
    "mmlu_stem",
  ]);
  assert.ok(keys.indexOf("mmlu_other") < keys.indexOf("mmlu_social_sciences"));
  assert.ok(!("mmlu" in (res["n-shot"] as object)) && "mmlu_anatomy" in (res["n-shot"] as object));
  // Task YAMLs write version: 1.0 (a float), group YAMLs version: 2.
  const text = harnessJson(res);
  assert.match(text, /\n {4}"mmlu": 2,\n/);
  assert.match(text, /\n {4}"mmlu_abstract_algebra": 1\.0,\n/);
  assert.match(text, /\n {8}"version": 1\.0\n/);
  assert.deepStrictEqual(JSON.parse(text), res);
  // A category asked for alone keeps its alias, at depth 0; its subjects show their task_alias.
  const alone = await runMmlu(dir, ["mmlu_social_sciences", "mmlu_anatomy"]);
  // deno-lint-ignore no-explicit-any
  const a = alone.results as any;
  assert.deepStrictEqual(Object.keys(a).slice(0, 3), [
    "mmlu_anatomy",
    "mmlu_social_sciences",
    "mmlu_econometrics",
  ]);
  assert.strictEqual(a.mmlu_social_sciences.alias, "social sciences");
  assert.strictEqual(a.mmlu_econometrics.alias, " - econometrics");
  assert.strictEqual(a.mmlu_anatomy.alias, "anatomy");
});

Deno.test('results: one doc gives stderr "N/A", and a group with such a task too', async () => {
  const { dir } = await mmluDir((i) => (i === 5 ? 1 : 2));
  const res = await runMmlu(dir, ["mmlu"]);
  // deno-lint-ignore no-explicit-any
  const r = res.results as any;
  const one = Object.values(MMLU_CATEGORIES).flat()[5];
  assert.strictEqual(r[`mmlu_${one}`]["acc_stderr,none"], "N/A");
  assert.strictEqual(r.mmlu["acc_stderr,none"], "N/A");
  assert.strictEqual(r.mmlu_stem["acc_stderr,none"], "N/A"); // subject 5 is a STEM subject
  assert.strictEqual(typeof r.mmlu_other["acc_stderr,none"], "number");
  assert.match(harnessJson(res), /"acc_stderr,none": "N\/A"/);
  assert.match(
    formatTable(res, "groups"),
    /\|mmlu {2,}\|\s+2\|none\s*\|\s*\|acc\s*\|↑\|\d\.\d{4}\|±\|\s*N\/A\|/,
  );
});

Deno.test("results JSON: config, times, tokenizer, model name and the harness version", async () => {
  const dir = await Deno.makeTempDir();
  await write(
    `${dir}/winogrande/validation.jsonl`,
    jsonl([{ sentence: "A _ was tilted.", option1: "x", option2: "y", answer: "1" }]),
  );
  const task = await loadTask("winogrande", dir, 1, 0);
  const scored = await scoreTasks(new FakeLM(() => -1), [task], 0);
  // winogrande logs doc_to_target, the continuation text, not the gold index.
  assert.strictEqual(scored.get("winogrande")!.samples[0].target, "was tilted.");
  const tokenizer = {
    bosId: 1,
    eosId: 2,
    padId: null,
    encode: () => [],
    decode: (ids: number[]) => ["<unk>", "<s>", "</s>"][ids[0]],
  };
  const res = buildResults(
    {
      model: "moe-condense",
      modelArgs: "pretrained=/m/tiny:v1,backend=cpu",
      batchSize: 8,
      device: "cpu",
      limit: 1,
      numFewshot: 0,
      requested: ["winogrande"],
    },
    [task],
    scored,
    { ...RUN, tokenizer: harnessTokenizerInfo(tokenizer, 512) },
  );
  const text = harnessJson(res);
  const parsed = JSON.parse(text);
  assert.strictEqual(parsed.results.winogrande["acc_stderr,none"], "N/A");
  assert.strictEqual(parsed.config.bootstrap_iters, 100000);
  assert.strictEqual(parsed.model_name, "/m/tiny:v1");
  assert.strictEqual(parsed.model_name_sanitized, "__m__tiny__v1");
  assert.strictEqual(parsed.model_source, "moe-condense");
  assert.strictEqual(parsed.start_time, 10);
  assert.strictEqual(parsed.end_time, 11.5);
  assert.strictEqual(parsed.total_evaluation_time_seconds, "1.5");
  assert.deepStrictEqual(parsed.tokenizer_pad_token, ["</s>", "2"]); // no pad token: EOS
  assert.deepStrictEqual(parsed.tokenizer_bos_token, ["<s>", "1"]);
  assert.strictEqual(parsed.eot_token_id, 2);
  assert.strictEqual(parsed.max_length, 512);
  assert.strictEqual(parsed.lm_eval_version_matched, "0.4.9.1");
  assert.deepStrictEqual(parsed.configs.winogrande.training_split, "train");
  assert.ok(!("test_split" in parsed.configs.winogrande)); // unset in the YAML
  // Python floats: the metric, --limit (type=float in the CLI), times; ints stay ints.
  assert.match(text, /"acc,none": (1|0)\.0,/);
  assert.match(text, /"limit": 1\.0,/);
  assert.match(text, /"date": 0\.0,/);
  assert.match(text, /"start_time": 10\.0,/);
  assert.match(text, /"batch_size": 8,/);
  assert.match(text, /"winogrande": 1\.0\n/);
});

Deno.test("pyJsonDumps writes what Python's json.dumps(indent=2, ensure_ascii=False) writes", () => {
  // python3: [repr(x) for x in xs]
  const xs = [
    1.0,
    0.73,
    1e-05,
    1.5e16,
    1e16,
    123456789.125,
    0.0001,
    297772.2670899628,
    2 / 3,
    -0.5,
  ];
  const more = [1e22, 5e-324, 1e15, 0.00012345, -1.0e-7, 100.0];
  assert.deepStrictEqual([...xs, ...more].map(pyFloatRepr), [
    "1.0",
    "0.73",
    "1e-05",
    "1.5e+16",
    "1e+16",
    "123456789.125",
    "0.0001",
    "297772.2670899628",
    "0.6666666666666666",
    "-0.5",
    "1e+22",
    "5e-324",
    "1000000000000000.0",
    "0.00012345",
    "-1e-07",
    "100.0",
  ]);
  // json.dumps({'a': {'b': [1, 2.0, 'x\né"'], 'c': {}}, 'd': [], 'e': None, 'f': True,
  //             'g': 0.5, 'h': 3}, indent=2, ensure_ascii=False)
  const value = { a: { b: [1, 2, 'x\né"'], c: {} }, d: [], e: null, f: true, g: 0.5, h: 3 };
  const text = pyJsonDumps(value, (p) => p.join("/") === "a/b/1");
  assert.strictEqual(
    text,
    '{\n  "a": {\n    "b": [\n      1,\n      2.0,\n      "x\\né\\""\n    ],\n    "c": {}\n  },\n' +
      '  "d": [],\n  "e": null,\n  "f": true,\n  "g": 0.5,\n  "h": 3\n}',
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
