// Build the shipped evaluation tasks deterministically from held-out public-domain text
// of the default model's corpus (State of the Union 2000-2021, Moby-Dick), in the same
// {query, choices, gold} JSON-lines layout the evaluator reads.
//
//   sotu_cloze          next word after a passage prefix: true word vs a corpus word of similar length
//   sotu_word_order     next words mid-sentence vs the same words in another order
//   mobydick_cloze      sotu_cloze on Moby-Dick (out of domain)
//   sotu_ppl / mobydick_ppl   whole passages for perplexity / bits per byte
//
// Test items come from data/valid_sotu.jsonl (dev/few-shot items from data/calib_sotu.jsonl)
// and data/test_mobydick.jsonl (the last 20 passages are its dev split).

import { parseArgs } from "node:util";
import { PyRandom } from "../lib/eval/pyrandom.ts";
import { writeTextAtomic } from "../lib/io/results.ts";

const HELP = `usage: deno run -A scripts/make_tasks.ts [--out data/tasks] [--seed 1234]
  [--cloze N] [--word-order N] [--ppl-docs N] [--context-chars N]

Writes data/tasks/<task>/{test,dev}.jsonl. Same seed, same files.`;

const { values: args } = parseArgs({
  options: {
    out: { type: "string", default: "data/tasks" },
    seed: { type: "string", default: "1234" },
    cloze: { type: "string", default: "200" },
    "word-order": { type: "string", default: "200" },
    "ppl-docs": { type: "string", default: "16" },
    "context-chars": { type: "string", default: "64" },
    help: { type: "boolean", default: false },
  },
});
if (args.help) {
  console.log(HELP);
  Deno.exit(0);
}

const CONTEXT_CHARS = Number(args["context-chars"]);

async function passages(path: string): Promise<string[]> {
  const text = await Deno.readTextFile(path);
  return text.split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l).text as string);
}

/** Keep at most `chars` characters of the end of `text`, starting at a word. */
function tail(text: string, chars: number): string {
  if (text.length <= chars) return text;
  const cut = text.slice(text.length - chars);
  const space = cut.indexOf(" ");
  return space >= 0 ? cut.slice(space + 1) : cut;
}

interface Item {
  query: string;
  choices: string[];
  gold: number;
}

function shuffleIn(rnd: PyRandom, truth: string, distractors: string[]): Item & { query: "" } {
  const choices = [truth, ...distractors];
  const order = choices.map((_, i) => i);
  rnd.shuffle(order);
  return { query: "", choices: order.map((i) => choices[i]), gold: order.indexOf(0) };
}

/** Next-word cloze: words of >= 4 letters preceded by a space, at least CONTEXT_CHARS in. */
function clozeItems(texts: string[], count: number, rnd: PyRandom): Item[] {
  const wordRe = / ([A-Za-z]{4,})\b/g;
  const vocab = [...new Set(texts.flatMap((t) => [...t.matchAll(wordRe)].map((m) => m[1])))].sort();
  const slots: { text: number; at: number; word: string }[] = [];
  texts.forEach((t, ti) => {
    for (const m of t.matchAll(wordRe)) {
      if (m.index! >= CONTEXT_CHARS) slots.push({ text: ti, at: m.index!, word: m[1] });
    }
  });
  const picked = rnd.sample(slots, Math.min(count, slots.length));
  return picked.map((s) => {
    const similar = vocab.filter((w) =>
      Math.abs(w.length - s.word.length) <= 1 && w.toLowerCase() !== s.word.toLowerCase()
    );
    const distractor = similar[rnd.randbelow(similar.length)];
    const item = shuffleIn(rnd, s.word, [distractor]);
    return { ...item, query: tail(texts[s.text].slice(0, s.at), CONTEXT_CHARS) };
  });
}

/** The next three or more words after position `at` (a space), at least 16 characters, or null. */
function nextWords(text: string, at: number): string | null {
  const words = text.slice(at + 1).split(" ");
  let out = "", n = 0;
  for (const w of words) {
    out = out ? `${out} ${w}` : w;
    n++;
    if (out.length >= 16 && n >= 3) break;
  }
  // Lower-case words only, no punctuation: the order is the only difference between choices.
  return out.length >= 16 && n >= 3 && /^[a-z][a-z' ]*[a-z]$/.test(out) ? out : null;
}

/**
 * Word order: the passage's next words vs the same words in another order. Both choices
 * have the same characters, so only fluency given the context separates them. (Versions
 * with the true continuation vs a phrase or sentence opening from another passage scored
 * at chance with the default model, 0.52-0.535 +- 0.035, so they are not shipped.)
 */
function wordOrderItems(texts: string[], count: number, rnd: PyRandom): Item[] {
  const slots: { text: number; at: number; next: string }[] = [];
  texts.forEach((t, ti) => {
    for (const m of t.matchAll(/ (?=[a-z])/g)) {
      const next = nextWords(t, m.index!);
      if (m.index! >= CONTEXT_CHARS && next) slots.push({ text: ti, at: m.index!, next });
    }
  });
  const picked = rnd.sample(slots, Math.min(count, slots.length));
  return picked.map((s) => {
    const words = s.next.split(" ");
    let shuffled = s.next;
    while (shuffled === s.next) {
      rnd.shuffle(words);
      shuffled = words.join(" ");
    }
    const item = shuffleIn(rnd, s.next, [shuffled]);
    return { ...item, query: tail(texts[s.text].slice(0, s.at), CONTEXT_CHARS) };
  });
}

async function writeJsonl(path: string, rows: unknown[]): Promise<void> {
  await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
  await writeTextAtomic(path, rows.map((r) => JSON.stringify(r)).join("\n") + "\n");
  console.log(`${path}: ${rows.length} items`);
}

const seed = Number(args.seed), out = args.out!;
const valid = await passages("data/valid_sotu.jsonl");
const calib = await passages("data/calib_sotu.jsonl");
const moby = await passages("data/test_mobydick.jsonl");
const mobyTest = moby.slice(0, moby.length - 20), mobyDev = moby.slice(moby.length - 20);
const nCloze = Number(args.cloze),
  nCont = Number(args["word-order"]),
  nPpl = Number(args["ppl-docs"]);

// Each file gets its own RNG so changing one task's size leaves the others as they were.
await writeJsonl(`${out}/sotu_cloze/test.jsonl`, clozeItems(valid, nCloze, new PyRandom(seed)));
await writeJsonl(`${out}/sotu_cloze/dev.jsonl`, clozeItems(calib, 50, new PyRandom(seed + 1)));
await writeJsonl(
  `${out}/sotu_word_order/test.jsonl`,
  wordOrderItems(valid, nCont, new PyRandom(seed + 2)),
);
await writeJsonl(
  `${out}/sotu_word_order/dev.jsonl`,
  wordOrderItems(calib, 50, new PyRandom(seed + 3)),
);
await writeJsonl(
  `${out}/mobydick_cloze/test.jsonl`,
  clozeItems(mobyTest, nCloze, new PyRandom(seed + 4)),
);
await writeJsonl(
  `${out}/mobydick_cloze/dev.jsonl`,
  clozeItems(mobyDev, 50, new PyRandom(seed + 5)),
);
await writeJsonl(`${out}/sotu_ppl/test.jsonl`, valid.slice(0, nPpl).map((text) => ({ text })));
await writeJsonl(
  `${out}/mobydick_ppl/test.jsonl`,
  mobyTest.slice(0, nPpl).map((text) => ({ text })),
);
