// Small helpers the CD-MoE scripts share on top of lib/cli.ts: flag parsing with errors
// that name the flag, and a progress line on stderr.

import { UsageError } from "../cli.ts";
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
 * "12.5 tokens/s", or for work slower than one a second "3.2 s/candidate" (the unit less
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
