// Task definitions as data, following lm-evaluation-harness v0.4.9.1's YAML configs: where
// the docs come from, how a doc becomes a context, choices and a gold index, which metrics.
// The `template` strings only document the harness's Jinja for the results' `configs`.

import type { Doc } from "./data.ts";

export type FieldType = "string" | "number" | "string[]" | "label";

export interface TaskDef {
  name: string;
  /** The YAML's task_alias (shown instead of the name in results and tables). */
  alias?: string;
  /** metadata.version; every task YAML writes a float (1.0), so the results JSON does too. */
  version: number;
  outputType: "multiple_choice" | "loglikelihood_rolling";
  /** dataset_path and dataset_name as the YAML writes them (also where to look under --data-dir). */
  datasetPath: string;
  datasetName: string | null;
  /** The dataset's current hub id where it moved since (another folder to look in). */
  hubPath?: string;
  /**
   * The YAML's splits, null where it leaves them unset. The harness evaluates the test split,
   * else validation; few-shot docs come from fewshot_split, else training, else validation.
   * Whether fewshot_split == test_split (null == null included) decides how it samples.
   */
  trainingSplit: string | null;
  validationSplit: string | null;
  testSplit: string | null;
  fewshotSplit: string | null;
  /** "default": rnd.sample (seed 1234); "first_n": the first n few-shot docs. */
  sampler: "default" | "first_n";
  /** Fields every doc must have (dotted paths for nested ones) and their types. */
  fields: Record<string, FieldType>;
  description: string;
  /** multiple_choice: the context. Multiple-input tasks use docToChoice as contexts instead. */
  docToText: (doc: Doc) => string;
  docToChoice: (doc: Doc) => string[];
  docToTarget: (doc: Doc) => number;
  /** Winogrande: choices are contexts and this shared text is the continuation. */
  multipleInputContinuation?: (doc: Doc) => string;
  metrics: string[];
  template: { doc_to_text: string; doc_to_choice: string; doc_to_target: string };
  /** Our own tasks live under data/tasks/<name>/. */
  shipped?: boolean;
}

const s = (d: Doc, k: string) => d[k] as string;
const nested = (d: Doc, k: string, sub: string) => (d[k] as Record<string, unknown>)[sub];
/** Labels arrive as ints (Parquet / most JSON) or digit strings (HellaSwag, Winogrande). */
const label = (v: unknown) => (typeof v === "number" ? v : parseInt(String(v).trim(), 10));

/** HellaSwag's preprocess from the harness's utils.py. */
export function hellaswagPreprocess(text: string): string {
  text = text.trim();
  text = text.replaceAll(" [title]", ". ");
  text = text.replace(/\[.*?\]/g, "");
  text = text.replaceAll("  ", " ");
  return text;
}

/** Python str.capitalize(): first character upper case, the rest lower case. */
export function pyCapitalize(text: string): string {
  const chars = [...text];
  if (chars.length === 0) return "";
  return chars[0].toUpperCase() + chars.slice(1).join("").toLowerCase();
}

const ACC = ["acc"], ACC_NORM = ["acc", "acc_norm"];

function arc(name: string, config: string): TaskDef {
  return {
    name,
    version: 1.0,
    outputType: "multiple_choice",
    datasetPath: "allenai/ai2_arc",
    datasetName: config,
    trainingSplit: "train",
    validationSplit: "validation",
    testSplit: "test",
    fewshotSplit: null,
    sampler: "default",
    fields: {
      question: "string",
      "choices.text": "string[]",
      "choices.label": "string[]",
      answerKey: "string",
    },
    description: "",
    docToText: (d) => `Question: ${s(d, "question")}\nAnswer:`,
    docToChoice: (d) => nested(d, "choices", "text") as string[],
    docToTarget: (d) => (nested(d, "choices", "label") as string[]).indexOf(s(d, "answerKey")),
    metrics: ACC_NORM,
    template: {
      doc_to_text: "Question: {{question}}\nAnswer:",
      doc_to_choice: "{{choices.text}}",
      doc_to_target: "{{choices.label.index(answerKey)}}",
    },
  };
}

const BASE_TASKS: TaskDef[] = [
  arc("arc_easy", "ARC-Easy"),
  arc("arc_challenge", "ARC-Challenge"),
  {
    name: "boolq",
    version: 2.0,
    outputType: "multiple_choice",
    datasetPath: "super_glue",
    datasetName: "boolq",
    hubPath: "aps/super_glue",
    trainingSplit: "train",
    validationSplit: "validation",
    testSplit: null,
    fewshotSplit: null,
    sampler: "default",
    fields: { passage: "string", question: "string", label: "label" },
    description: "",
    docToText: (d) => `${s(d, "passage")}\nQuestion: ${s(d, "question")}?\nAnswer:`,
    docToChoice: () => ["no", "yes"],
    docToTarget: (d) => label(d.label),
    metrics: ACC,
    template: {
      doc_to_text: "{{passage}}\nQuestion: {{question}}?\nAnswer:",
      doc_to_choice: "['no', 'yes']",
      doc_to_target: "label",
    },
  },
  {
    name: "hellaswag",
    version: 1.0,
    outputType: "multiple_choice",
    datasetPath: "Rowan/hellaswag",
    datasetName: null,
    trainingSplit: "train",
    validationSplit: "validation",
    testSplit: null,
    fewshotSplit: null,
    sampler: "default",
    fields: {
      activity_label: "string",
      ctx_a: "string",
      ctx_b: "string",
      endings: "string[]",
      label: "label",
    },
    description: "",
    docToText: (d) =>
      hellaswagPreprocess(
        `${s(d, "activity_label")}: ${s(d, "ctx_a")} ${pyCapitalize(s(d, "ctx_b"))}`,
      ),
    docToChoice: (d) => (d.endings as string[]).map(hellaswagPreprocess),
    docToTarget: (d) => label(d.label),
    metrics: ACC_NORM,
    template: {
      doc_to_text:
        "{{query}}  (query = preprocess(activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize()))",
      doc_to_choice: "choices  (= [preprocess(e) for e in endings])",
      doc_to_target: "label",
    },
  },
  {
    name: "piqa",
    version: 1.0,
    outputType: "multiple_choice",
    datasetPath: "baber/piqa",
    datasetName: null,
    trainingSplit: "train",
    validationSplit: "validation",
    testSplit: null,
    fewshotSplit: null,
    sampler: "default",
    fields: { goal: "string", sol1: "string", sol2: "string", label: "label" },
    description: "",
    docToText: (d) => `Question: ${s(d, "goal")}\nAnswer:`,
    docToChoice: (d) => [s(d, "sol1"), s(d, "sol2")],
    docToTarget: (d) => label(d.label),
    metrics: ACC_NORM,
    template: {
      doc_to_text: "Question: {{goal}}\nAnswer:",
      doc_to_choice: "{{[sol1, sol2]}}",
      doc_to_target: "label",
    },
  },
  {
    name: "winogrande",
    version: 1.0,
    outputType: "multiple_choice",
    datasetPath: "winogrande",
    datasetName: "winogrande_xl",
    hubPath: "allenai/winogrande",
    trainingSplit: "train",
    validationSplit: "validation",
    testSplit: null,
    fewshotSplit: null,
    sampler: "default",
    fields: { sentence: "string", option1: "string", option2: "string", answer: "label" },
    description: "",
    // Multiple input: the few-shot example text is the gold choice's context.
    docToText: (d) => winograndeContexts(d)[label(d.answer) - 1],
    docToChoice: winograndeContexts,
    docToTarget: (d) => label(d.answer) - 1,
    multipleInputContinuation: (d) => {
      const sentence = s(d, "sentence");
      return sentence.slice(sentence.indexOf("_") + 1).trim();
    },
    metrics: ACC,
    template: {
      doc_to_text: "{{answer_to_num[answer]}}  (multiple input)",
      doc_to_choice:
        "[sentence[:idx] + option for option in (option1, option2)], idx = sentence.index('_')",
      doc_to_target: "sentence[idx + 1:].strip()",
    },
  },
  {
    name: "openbookqa",
    version: 1.0,
    outputType: "multiple_choice",
    datasetPath: "openbookqa",
    datasetName: "main",
    hubPath: "allenai/openbookqa",
    trainingSplit: "train",
    validationSplit: "validation",
    testSplit: "test",
    fewshotSplit: null,
    sampler: "default",
    fields: {
      question_stem: "string",
      "choices.text": "string[]",
      "choices.label": "string[]",
      answerKey: "string",
    },
    description: "",
    docToText: (d) => s(d, "question_stem"),
    docToChoice: (d) => nested(d, "choices", "text") as string[],
    docToTarget: (d) =>
      (nested(d, "choices", "label") as string[]).indexOf(s(d, "answerKey").trimStart()),
    metrics: ACC_NORM,
    template: {
      doc_to_text: "question_stem",
      doc_to_choice: "{{choices.text}}",
      doc_to_target: "{{choices.label.index(answerKey.lstrip())}}",
    },
  },
  {
    name: "rte",
    version: 1.0,
    outputType: "multiple_choice",
    datasetPath: "nyu-mll/glue",
    datasetName: "rte",
    trainingSplit: "train",
    validationSplit: "validation",
    testSplit: null,
    fewshotSplit: null,
    sampler: "default",
    fields: { sentence1: "string", sentence2: "string", label: "label" },
    description: "",
    docToText: (d) =>
      `${s(d, "sentence1")}\nQuestion: ${s(d, "sentence2")} True or False?\nAnswer:`,
    docToChoice: () => ["True", "False"],
    docToTarget: (d) => label(d.label),
    metrics: ACC,
    template: {
      doc_to_text: "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
      doc_to_choice: "['True', 'False']",
      doc_to_target: "label",
    },
  },
];

function winograndeContexts(d: Doc): string[] {
  const sentence = s(d, "sentence"), idx = sentence.indexOf("_");
  return [s(d, "option1"), s(d, "option2")].map((opt) => sentence.slice(0, idx) + opt);
}

/** The 57 MMLU subjects by the harness's four categories (its group order). */
export const MMLU_CATEGORIES: Record<string, string[]> = {
  stem: [
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "electrical_engineering",
    "elementary_mathematics",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_mathematics",
    "high_school_physics",
    "high_school_statistics",
    "machine_learning",
  ],
  other: [
    "business_ethics",
    "clinical_knowledge",
    "college_medicine",
    "global_facts",
    "human_aging",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "nutrition",
    "professional_accounting",
    "professional_medicine",
    "virology",
  ],
  social_sciences: [
    "econometrics",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_microeconomics",
    "high_school_psychology",
    "human_sexuality",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
  ],
  humanities: [
    "formal_logic",
    "high_school_european_history",
    "high_school_us_history",
    "high_school_world_history",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "moral_disputes",
    "moral_scenarios",
    "philosophy",
    "prehistory",
    "professional_law",
    "world_religions",
  ],
};

function mmluSubject(subject: string): TaskDef {
  return {
    name: `mmlu_${subject}`,
    alias: subject,
    version: 1.0,
    outputType: "multiple_choice",
    datasetPath: "cais/mmlu",
    datasetName: subject,
    trainingSplit: null,
    validationSplit: null,
    testSplit: "test",
    fewshotSplit: "dev",
    sampler: "first_n",
    fields: { question: "string", choices: "string[]", answer: "label" },
    description: `The following are multiple choice questions (with answers) about ${
      subject.replaceAll("_", " ")
    }.\n\n`,
    docToText: (d) => {
      const c = d.choices as string[];
      return `${s(d, "question").trim()}\nA. ${c[0]}\nB. ${c[1]}\nC. ${c[2]}\nD. ${c[3]}\nAnswer:`;
    },
    docToChoice: () => ["A", "B", "C", "D"],
    docToTarget: (d) => label(d.answer),
    metrics: ACC,
    template: {
      doc_to_text:
        "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
      doc_to_choice: "['A', 'B', 'C', 'D']",
      doc_to_target: "answer",
    },
  };
}

/** Our shipped multiple-choice tasks: {query, choices, gold} JSON lines under data/tasks/<name>/. */
function shippedChoiceTask(name: string): TaskDef {
  return {
    name,
    version: 1.0,
    outputType: "multiple_choice",
    datasetPath: `data/tasks/${name}`,
    datasetName: null,
    trainingSplit: null,
    validationSplit: null,
    testSplit: "test",
    fewshotSplit: "dev",
    sampler: "default",
    fields: { query: "string", choices: "string[]", gold: "label" },
    description: "",
    docToText: (d) => s(d, "query"),
    docToChoice: (d) => d.choices as string[],
    docToTarget: (d) => label(d.gold),
    metrics: ACC_NORM,
    template: { doc_to_text: "{{query}}", doc_to_choice: "{{choices}}", doc_to_target: "{{gold}}" },
    shipped: true,
  };
}

/** Perplexity over whole documents, like the harness's wikitext task. */
function shippedPerplexityTask(name: string): TaskDef {
  return {
    name,
    version: 1.0,
    outputType: "loglikelihood_rolling",
    datasetPath: `data/tasks/${name}`,
    datasetName: null,
    trainingSplit: null,
    validationSplit: null,
    testSplit: "test",
    fewshotSplit: null,
    sampler: "default",
    fields: { text: "string" },
    description: "",
    docToText: (d) => s(d, "text"),
    docToChoice: () => [],
    docToTarget: () => 0,
    metrics: ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    template: { doc_to_text: "", doc_to_choice: "", doc_to_target: "{{text}}" },
    shipped: true,
  };
}

export const SHIPPED_TASKS = ["sotu_cloze", "sotu_word_order", "mobydick_cloze"];
export const SHIPPED_PERPLEXITY_TASKS = ["sotu_ppl", "mobydick_ppl"];

export const TASKS = new Map<string, TaskDef>();
for (const t of BASE_TASKS) TASKS.set(t.name, t);
for (const subjects of Object.values(MMLU_CATEGORIES)) {
  for (const subject of subjects) TASKS.set(`mmlu_${subject}`, mmluSubject(subject));
}
for (const n of SHIPPED_TASKS) TASKS.set(n, shippedChoiceTask(n));
for (const n of SHIPPED_PERPLEXITY_TASKS) TASKS.set(n, shippedPerplexityTask(n));

/** Groups: name -> subtasks (tasks or groups), aggregated weighted by size. */
export const GROUPS = new Map<string, string[]>();
GROUPS.set("mmlu", Object.keys(MMLU_CATEGORIES).map((c) => `mmlu_${c}`));
for (const [c, subjects] of Object.entries(MMLU_CATEGORIES)) {
  GROUPS.set(`mmlu_${c}`, subjects.map((x) => `mmlu_${x}`));
}
/** The group YAMLs' group_alias ("social sciences" with a space, as the harness prints it). */
export const GROUP_ALIASES = new Map<string, string>(
  Object.keys(MMLU_CATEGORIES).map((c) => [`mmlu_${c}`, c.replaceAll("_", " ")]),
);
/** The group YAMLs' metadata.version: an int (`version: 2`), unlike the tasks' floats. */
export const GROUP_VERSION = 2;

export function allTaskNames(): string[] {
  return [...TASKS.keys(), ...GROUPS.keys()];
}
