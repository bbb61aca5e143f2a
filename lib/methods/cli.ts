// Small helpers the CD-MoE scripts share on top of lib/cli.ts: flag parsing with errors
// that name the flag, and a progress line on stderr.

import { UsageError } from "../cli.ts";
import {
  type BosMode,
  DEFAULT_BATCH_SIZE,
  DEFAULT_CALIBRATION,
  DEFAULT_DOCS,
} from "./calibration.ts";
export { UsageError };

export const DEFAULT_MODEL = new URL("../../data/models/tiny-deepseek-moe", import.meta.url)
  .pathname;

export function intFlag(value: string | undefined, flag: string, def: number, min = 1): number {
  if (value === undefined) return def;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min) {
    throw new UsageError(`${flag}: expected an integer >= ${min}, got "${value}"`);
  }
  return n;
}

/** "5GB" (decimal, as HF counts), "500MB", "1GiB", or plain bytes. */
export function sizeFlag(value: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?$/i.exec(value.trim());
  const units: Record<string, number> = {
    b: 1,
    kb: 1e3,
    mb: 1e6,
    gb: 1e9,
    kib: 2 ** 10,
    mib: 2 ** 20,
    gib: 2 ** 30,
  };
  const bytes = m ? Number(m[1]) * units[(m[2] ?? "b").toLowerCase()] : NaN;
  if (!Number.isFinite(bytes) || bytes < 1) {
    throw new UsageError(`${flag}: expected a size like 5GB, 500MB or 1GiB, got "${value}"`);
  }
  return Math.floor(bytes);
}

/** A token length: an integer >= 2, or "full" (null: no truncation). Absent: `def`. */
export function lengthFlag(
  value: string | undefined,
  flag: string,
  def: number | null,
): number | null {
  if (value === undefined) return def;
  if (value === "full") return null;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 2) {
    throw new UsageError(`${flag}: expected "full" or an integer >= 2, got "${value}"`);
  }
  return n;
}

export function choiceFlag<T extends string>(
  value: string | undefined,
  flag: string,
  choices: readonly T[],
  def: T,
): T {
  if (value === undefined) return def;
  if (!(choices as readonly string[]).includes(value)) {
    throw new UsageError(`${flag}: unknown value "${value}" (choose one of ${choices.join(", ")})`);
  }
  return value as T;
}

/**
 * The options of the scripts that run a model over calibration text (the search, the routing
 * profile), as parseCli takes them; each script adds its own.
 */
export const CALIBRATION_OPTIONS = {
  model: { type: "string" },
  data: { type: "string" },
  docs: { type: "string" },
  "max-len": { type: "string" },
  "batch-size": { type: "string" },
  bos: { type: "string" },
  layerwise: { type: "boolean" },
  name: { type: "string" },
  results: { type: "string" },
  quiet: { type: "boolean" },
  backend: { type: "string" },
} as const;

/**
 * The help lines of CALIBRATION_OPTIONS' model and text; `lengthHelp`, each script's own lines
 * for --max-len (the profile takes "full", the search a number and the profile's length).
 */
export function calibrationHelp(lengthHelp: string): string {
  return `\
  --model DIR          HF model folder (default ${DEFAULT_MODEL})
  --data FILE          calibration JSON lines with "text" (default ${DEFAULT_CALIBRATION})
  --docs N             documents, from the start of the file (default ${DEFAULT_DOCS})
${lengthHelp}
  --batch-size N       documents per forward batch (default ${DEFAULT_BATCH_SIZE})
  --bos MODE           auto|yes|no: auto prepends the config's bos_token_id when it has one
                       (DeepSeek, Mixtral; the default model was trained on BOS-prefixed
                       documents) unless the tokenizer already adds it (default auto)`;
}

/**
 * The model and calibration text that CALIBRATION_OPTIONS' values name, checked (--max-len
 * is each script's own).
 */
export function calibrationFlags(values: {
  model?: string;
  data?: string;
  docs?: string;
  "batch-size"?: string;
  bos?: string;
}) {
  return {
    model: values.model ?? DEFAULT_MODEL,
    data: values.data ?? DEFAULT_CALIBRATION,
    docs: intFlag(values.docs, "--docs", DEFAULT_DOCS),
    batchSize: intFlag(values["batch-size"], "--batch-size", DEFAULT_BATCH_SIZE),
    bos: choiceFlag<BosMode>(values.bos, "--bos", ["auto", "yes", "no"], "auto"),
  };
}

/**
 * A progress rate: "12.5 tokens/s", or for work slower than one a second "3.2 s/candidate" (the unit less
 * its plural s): "0.0 candidates/s" said nothing. "?" before the first one is done.
 */
export function rateText(count: number, seconds: number, unit: string): string {
  if (count <= 0) return `? ${unit}/s`;
  if (count >= seconds) return `${(count / Math.max(seconds, 1e-9)).toFixed(1)} ${unit}/s`;
  return `${(seconds / count).toFixed(1)} s/${unit.replace(/s$/, "")}`;
}

/**
 * A rate-limited progress line on stderr: what, done/total, rate, ETA. `from`: what was
 * done before this run (a resumed job), left out of the rate and the ETA.
 */
export class Progress {
  private start = performance.now();
  private last = 0;
  constructor(
    private what: string,
    private total: number,
    private unit: string,
    private from = 0,
  ) {}
  /** `units`: what the rate counts, where it is not `done` (tokens of done layers). */
  update(done: number, units?: number) {
    const now = performance.now();
    if (now - this.last < 1000 && done < this.total) return;
    this.last = now;
    const sec = (now - this.start) / 1000, doneNow = done - this.from;
    const eta = doneNow > 0 ? (sec / doneNow) * (this.total - done) : NaN;
    const msg =
      `\r${this.what}: ${done}/${this.total}  ${rateText(units ?? doneNow, sec, this.unit)}  ` +
      `elapsed ${sec.toFixed(0)}s  ETA ${Number.isFinite(eta) ? eta.toFixed(0) + "s" : "?"}   `;
    Deno.stderr.writeSync(new TextEncoder().encode(msg));
    if (done >= this.total) Deno.stderr.writeSync(new TextEncoder().encode("\n"));
  }
}
