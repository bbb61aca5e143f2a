// Versioned JSON results: written to a temporary file and renamed, so a killed run
// never leaves a half-written result.

export async function writeJsonAtomic(path: string, value: unknown): Promise<void> {
  const dir = path.substring(0, path.lastIndexOf("/"));
  if (dir) await Deno.mkdir(dir, { recursive: true });
  const tmp = `${path}.tmp`;
  await Deno.writeTextFile(tmp, JSON.stringify(value, null, 2) + "\n");
  await Deno.rename(tmp, path);
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
