// Versioned JSON results: every file carries its kind, schema_version, the git commit
// and the date it was written, and is written atomically (temp file + rename) so a killed
// run never leaves half a file under the real name. Readers refuse other kinds/schemas.

import { createHash } from "node:crypto";

export class ResultsError extends Error {
  constructor(path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "ResultsError";
  }
}

export interface ResultsHeader {
  kind: string;
  schema_version: number;
  git_commit: string | null;
  date: string;
}

/** The current git commit (with "-dirty" when the tree has changes), or null outside git. */
export async function gitCommit(): Promise<string | null> {
  try {
    const run = (args: string[]) =>
      new Deno.Command("git", { args, stdout: "piped", stderr: "null" }).output();
    const head = await run(["rev-parse", "HEAD"]);
    if (!head.success) return null;
    const dirty = await run(["status", "--porcelain", "--untracked-files=no"]);
    const commit = new TextDecoder().decode(head.stdout).trim();
    return new TextDecoder().decode(dirty.stdout).trim() ? `${commit}-dirty` : commit;
  } catch {
    return null;
  }
}

/**
 * Write text to a unique temp file beside `path`, then rename over it (same directory, so
 * atomic): readers never see half a file, and a failed write leaves nothing behind.
 */
export async function writeTextAtomic(path: string, text: string): Promise<void> {
  const dir = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : ".";
  await Deno.mkdir(dir, { recursive: true });
  const tmp = `${path}.tmp-${Deno.pid}-${Date.now()}`;
  try {
    await Deno.writeTextFile(tmp, text);
    await Deno.rename(tmp, path);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
}

export function writeJsonAtomic(path: string, value: unknown): Promise<void> {
  return writeTextAtomic(path, JSON.stringify(value, null, 2) + "\n");
}

/** Header for a new results/state file of `kind`. */
export async function resultsHeader(kind: string, schemaVersion: number): Promise<ResultsHeader> {
  return {
    kind,
    schema_version: schemaVersion,
    git_commit: await gitCommit(),
    date: new Date().toISOString(),
  };
}

/** `results/<kind>/<YYYY-MM-DD>-<name>.json` under `root`. */
export function resultsPath(root: string, kind: string, name: string, date = new Date()): string {
  return `${root}/${kind}/${date.toISOString().slice(0, 10)}-${name}.json`;
}

/** Read a results file and check its kind and schema version; returns the whole object. */
export async function readResults(
  path: string,
  kind: string,
  schemaVersion: number,
): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new ResultsError(path, `cannot read (${(e as Error).message})`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new ResultsError(path, `malformed JSON (${(e as Error).message})`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ResultsError(path, "expected a JSON object");
  }
  const obj = value as Record<string, unknown>;
  if (obj.kind !== kind) {
    throw new ResultsError(path, `is a "${obj.kind}" file, expected "${kind}"`);
  }
  if (obj.schema_version !== schemaVersion) {
    throw new ResultsError(
      path,
      `schema_version ${JSON.stringify(obj.schema_version)} is not supported ` +
        `(this version reads ${schemaVersion})`,
    );
  }
  return obj;
}

export async function sha256Hex(bytes: Uint8Array | string): Promise<string> {
  const data = typeof bytes === "string" ? new TextEncoder().encode(bytes) : bytes;
  const digest = await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** SHA-256 of a file, read in 16 MiB pieces (a shard of up to 1 GiB is hashed whole). */
export async function hashFile(path: string): Promise<string> {
  const hash = createHash("sha256"), file = await Deno.open(path);
  try {
    const buf = new Uint8Array(2 ** 24);
    for (let n = await file.read(buf); n !== null; n = await file.read(buf)) {
      hash.update(buf.subarray(0, n));
    }
  } finally {
    file.close();
  }
  return hash.digest("hex");
}

/**
 * Hash of a model folder's identity: config.json, the shard index, the tokenizer files, and every shard's
 * bytes (shards under 1 GiB) or header + size (bigger shards: reading many GB just to
 * hash them would cost more than the search).
 */
export async function hashModelFolder(dir: string): Promise<string> {
  const parts: string[] = [await Deno.readTextFile(`${dir}/config.json`)];
  const names = [...Deno.readDirSync(dir)].map((e) => e.name).sort();
  for (const name of names) {
    // The tokenizer decides the token ids every result is computed on.
    if (
      name === "model.safetensors.index.json" || name === "tokenizer.json" ||
      name === "tokenizer_config.json"
    ) parts.push(name, await Deno.readTextFile(`${dir}/${name}`));
    if (!name.endsWith(".safetensors")) continue;
    const size = (await Deno.stat(`${dir}/${name}`)).size;
    if (size < 2 ** 30) {
      parts.push(name, await hashFile(`${dir}/${name}`));
      continue;
    }
    const f = await Deno.open(`${dir}/${name}`);
    try {
      const len = new Uint8Array(8);
      await f.read(len);
      const n = Number(new DataView(len.buffer).getBigUint64(0, true));
      const header = new Uint8Array(Math.min(n, 100_000_000));
      let got = 0;
      while (got < header.length) {
        const r = await f.read(header.subarray(got));
        if (r === null) break;
        got += r;
      }
      parts.push(name, String((await f.stat()).size), new TextDecoder().decode(header));
    } finally {
      f.close();
    }
  }
  return sha256Hex(parts.join("\n"));
}
