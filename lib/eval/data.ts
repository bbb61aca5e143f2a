// Task data from local files, in the layouts people have after downloading a Hugging Face
// dataset: JSON lines (`datasets` to_json, or our shipped tasks) and Parquet (the hub's
// `{split}-00000-of-0000N.parquet` shards). Every doc remembers its file and line (row)
// so that bad input can be reported precisely.

import { parquetReadObjects } from "hyparquet";

export type Doc = Record<string, unknown>;

export interface SourcedDoc {
  doc: Doc;
  file: string;
  /** 1-based line of a JSON lines file, or 1-based row of a Parquet file. */
  line: number;
}

export class TaskDataError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "TaskDataError";
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch {
    return false;
  }
}

async function listDir(dir: string): Promise<string[]> {
  try {
    const names: string[] = [];
    for await (const e of Deno.readDir(dir)) if (e.isFile) names.push(e.name);
    return names.sort();
  } catch {
    return [];
  }
}

/**
 * Files holding `split` in one folder: split.jsonl, split.json, split.parquet, or the
 * hub's shards split-*.parquet (all shards, in name order). Empty when none.
 */
export async function splitFilesIn(dir: string, split: string): Promise<string[]> {
  for (const name of [`${split}.jsonl`, `${split}.json`, `${split}.parquet`]) {
    if (await exists(`${dir}/${name}`)) return [`${dir}/${name}`];
  }
  const shards = (await listDir(dir)).filter((n) =>
    n.startsWith(`${split}-`) && n.endsWith(".parquet")
  );
  return shards.map((n) => `${dir}/${n}`);
}

/** The first candidate folder (or its data/ subfolder) that holds the split. */
export async function findSplitFiles(
  candidateDirs: string[],
  split: string,
): Promise<{ files: string[]; searched: string[] }> {
  const searched: string[] = [];
  for (const dir of candidateDirs) {
    for (const d of [dir, `${dir}/data`]) {
      searched.push(d);
      const files = await splitFilesIn(d, split);
      if (files.length > 0) return { files, searched };
    }
  }
  return { files: [], searched };
}

/** Parquet INT64 columns come back as BigInt; the task code wants plain numbers. */
function plain(v: unknown): unknown {
  if (typeof v === "bigint") return Number(v);
  if (Array.isArray(v)) return v.map(plain);
  if (v !== null && typeof v === "object" && !(v instanceof Uint8Array) && !(v instanceof Date)) {
    const out: Doc = {};
    for (const [k, x] of Object.entries(v)) out[k] = plain(x);
    return out;
  }
  return v;
}

export async function readDocs(file: string): Promise<SourcedDoc[]> {
  if (file.endsWith(".parquet")) {
    const bytes = await Deno.readFile(file);
    let rows: Doc[];
    try {
      const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
      rows = await parquetReadObjects({ file: buffer as ArrayBuffer });
    } catch (e) {
      throw new TaskDataError(`${file}: cannot read Parquet (${(e as Error).message})`);
    }
    return rows.map((r, i) => ({ doc: plain(r) as Doc, file, line: i + 1 }));
  }
  const text = await Deno.readTextFile(file);
  if (text.trimStart().startsWith("[")) {
    // A plain JSON array (datasets' to_json(lines=False)); rows count as lines.
    let rows: unknown;
    try {
      rows = JSON.parse(text);
    } catch (e) {
      throw new TaskDataError(`${file}: invalid JSON (${(e as Error).message})`);
    }
    return (rows as Doc[]).map((doc, i) => checkObject({ doc, file, line: i + 1 }));
  }
  const docs: SourcedDoc[] = [];
  text.split("\n").forEach((raw, i) => {
    if (raw.trim() === "") return;
    let doc: Doc;
    try {
      doc = JSON.parse(raw);
    } catch (e) {
      throw new TaskDataError(`${file}:${i + 1}: invalid JSON (${(e as Error).message})`);
    }
    docs.push(checkObject({ doc, file, line: i + 1 }));
  });
  return docs;
}

function checkObject(d: SourcedDoc): SourcedDoc {
  if (d.doc === null || typeof d.doc !== "object" || Array.isArray(d.doc)) {
    throw new TaskDataError(`${d.file}:${d.line}: expected a JSON object`);
  }
  return d;
}

export async function readSplit(files: string[]): Promise<SourcedDoc[]> {
  const all: SourcedDoc[] = [];
  for (const f of files) all.push(...await readDocs(f));
  return all;
}
