// Calibration text -> token batches. JSON lines with a "text" field; each document is
// tokenised with the model's tokenizer, optionally prefixed with BOS, truncated to
// maxLen. Documents of equal length share a batch (no padding: every row is real text).

import type { TextTokenizer } from "../io/tokenizer.ts";
import type { BatchShape } from "../model/decoder.ts";
import { hashFile } from "../io/results.ts";

export class DataError extends Error {
  constructor(path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "DataError"; // lib/cli.ts prints these as one line
  }
}

export const DEFAULT_CALIBRATION = new URL("../../data/calib_sotu.jsonl", import.meta.url).pathname;

/** The "text" of every line (blank lines skipped). Errors name the file and line. */
export async function readCalibrationTexts(path: string): Promise<string[]> {
  let raw: string;
  try {
    raw = await Deno.readTextFile(path);
  } catch (e) {
    throw new DataError(path, `cannot read (${(e as Error).message})`);
  }
  const texts: string[] = [];
  const lines = raw.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === "") continue;
    let obj: unknown;
    try {
      obj = JSON.parse(line);
    } catch (e) {
      throw new DataError(path, `line ${i + 1}: malformed JSON (${(e as Error).message})`);
    }
    const text = (obj as { text?: unknown } | null)?.text;
    if (typeof text !== "string") {
      throw new DataError(path, `line ${i + 1}: expected an object with a string "text"`);
    }
    if (text.length === 0) throw new DataError(path, `line ${i + 1}: empty "text"`);
    texts.push(text);
  }
  if (texts.length === 0) throw new DataError(path, "no documents (empty file)");
  return texts;
}

export type BosMode = "auto" | "yes" | "no";

export interface TokenizeOptions {
  docs: number;
  maxLen: number;
  /** auto: prepend the config's bos_token_id when it has one (DeepSeek, Mixtral) unless the tokenizer already did. */
  bos: BosMode;
  bosTokenId: number | null;
}

export interface CalibrationDocs {
  docs: Int32Array[];
  /** What was done about BOS, for the results file. */
  bos: { mode: BosMode; prepended: boolean; id: number | null; byTokenizer: boolean };
  tokens: number;
}

export function tokenizeCalibration(
  tok: TextTokenizer,
  texts: string[],
  opts: TokenizeOptions,
  path = "calibration",
): CalibrationDocs {
  if (opts.docs > texts.length) {
    throw new DataError(
      path,
      `asked for ${opts.docs} documents but the file has only ${texts.length}`,
    );
  }
  const prepend = opts.bos === "yes" || (opts.bos === "auto" && opts.bosTokenId !== null);
  if (prepend && opts.bosTokenId === null) {
    throw new DataError(path, "--bos yes but the model config has no bos_token_id");
  }
  const docs: Int32Array[] = [];
  let byTokenizer = false;
  for (const text of texts.slice(0, opts.docs)) {
    let ids = tok.encode(text, true);
    if (opts.bosTokenId !== null && ids[0] === opts.bosTokenId) {
      byTokenizer = true;
      if (opts.bos === "no") ids = ids.slice(1);
    } else if (prepend) ids = [opts.bosTokenId!, ...ids];
    docs.push(Int32Array.from(ids.slice(0, opts.maxLen)));
  }
  return {
    docs,
    bos: { mode: opts.bos, prepended: prepend, id: opts.bosTokenId, byTokenizer },
    tokens: docs.reduce((a, d) => a + d.length, 0),
  };
}

export interface CalibrationBatch {
  /** [batch * seqLen] token ids, sequence-major. */
  ids: Int32Array;
  shape: BatchShape;
  /** Index of each row-sequence's document in the calibration set. */
  docIndex: number[];
}

/** Group documents of equal length into batches of up to `batchSize`, in document order. */
export function makeBatches(docs: Int32Array[], batchSize: number): CalibrationBatch[] {
  const byLen = new Map<number, number[]>();
  docs.forEach((d, i) => {
    if (d.length < 2) return; // nothing to predict or compare meaningfully
    if (!byLen.has(d.length)) byLen.set(d.length, []);
    byLen.get(d.length)!.push(i);
  });
  const batches: CalibrationBatch[] = [];
  for (const [seqLen, idx] of byLen) {
    for (let i = 0; i < idx.length; i += batchSize) {
      const group = idx.slice(i, i + batchSize);
      const ids = new Int32Array(group.length * seqLen);
      group.forEach((d, b) => ids.set(docs[d], b * seqLen));
      batches.push({ ids, shape: { batch: group.length, seqLen }, docIndex: group });
    }
  }
  return batches;
}

/** Defaults shared by the profile and search scripts (see docs/cd-moe.md for the timing). */
export const DEFAULT_DOCS = 32;
export const DEFAULT_MAX_LEN = 256;
export const DEFAULT_BATCH_SIZE = 8;

export interface CalibrationSet {
  path: string;
  sha256: string;
  batches: CalibrationBatch[];
  docs: number;
  tokens: number;
  bos: CalibrationDocs["bos"];
}

/** Read, tokenise and batch a calibration file for a model. */
export async function loadCalibration(
  path: string,
  tok: TextTokenizer,
  opts: TokenizeOptions & { batchSize: number },
): Promise<CalibrationSet> {
  const texts = await readCalibrationTexts(path);
  const sha256 = await hashFile(path);
  const docs = tokenizeCalibration(tok, texts, opts, path);
  const batches = makeBatches(docs.docs, opts.batchSize);
  if (batches.length === 0) {
    throw new DataError(path, "no document has at least 2 tokens after tokenising");
  }
  return {
    path,
    sha256,
    batches,
    docs: batches.reduce((a, b) => a + b.shape.batch, 0),
    tokens: batches.reduce((a, b) => a + b.ids.length, 0),
    bos: docs.bos,
  };
}
