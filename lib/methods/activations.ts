// The searches' cached activations: under a name, one f32 array per calibration batch
// (a layer's input, an expert's output on every token). Kept in memory up to a budget;
// past it written to a file in a spill folder and read back when used, so a search's
// memory stays bounded whatever the number of layers, experts and tokens. The round trip
// is exact (the f32 bytes), so results do not depend on where an entry lived.

export class SpillError extends Error {
  constructor(path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "SpillError";
  }
}

interface Spilled {
  path: string;
  /** Entries of each batch's array. */
  lengths: number[];
}

export interface StoreStats {
  /** Bytes in memory now, and at most so far. */
  memoryBytes: number;
  peakMemoryBytes: number;
  /** Bytes written to and read from the spill folder. */
  spilledBytes: number;
  readBytes: number;
}

export class ActivationStore {
  private memory = new Map<string, Float32Array[]>();
  private spilled = new Map<string, Spilled>();
  private dir: string | null = null;
  private removeOnExit = () => this.dir && Deno.removeSync(this.dir, { recursive: true });
  readonly stats: StoreStats = {
    memoryBytes: 0,
    peakMemoryBytes: 0,
    spilledBytes: 0,
    readBytes: 0,
  };

  /**
   * budgetBytes: most bytes kept in memory (Infinity: never spill, 0: always); spillParent:
   * where the spill folder is made (default: the system's temp folder).
   */
  constructor(readonly budgetBytes = Infinity, private spillParent?: string) {}

  has(key: string): boolean {
    return this.memory.has(key) || this.spilled.has(key);
  }

  /** Whether `bytes` more would still be kept in memory. */
  fits(bytes: number): boolean {
    return this.stats.memoryBytes + bytes <= this.budgetBytes;
  }

  /** Keep `arrays` under `key` (replacing what was there); the store owns them now. */
  async set(key: string, arrays: Float32Array[]): Promise<void> {
    this.delete(key);
    const bytes = arrays.reduce((n, a) => n + a.byteLength, 0);
    if (this.fits(bytes)) {
      this.memory.set(key, arrays);
      this.stats.memoryBytes += bytes;
      this.stats.peakMemoryBytes = Math.max(this.stats.peakMemoryBytes, this.stats.memoryBytes);
      return;
    }
    if (this.dir === null) {
      this.dir = await Deno.makeTempDir({ dir: this.spillParent, prefix: "moe-condense-spill-" });
      globalThis.addEventListener("unload", this.removeOnExit);
    }
    const path = `${this.dir}/${key.replace(/[^\w.-]/g, "_")}.f32`;
    const file = await Deno.open(path, { write: true, create: true, truncate: true });
    try {
      for (const a of arrays) {
        const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
        for (let done = 0; done < bytes.length;) {
          done += await file.write(bytes.subarray(done, done + 2 ** 26));
        }
      }
    } catch (e) {
      file.close();
      await Deno.remove(path).catch(() => {});
      throw new SpillError(path, `spill write failed (${(e as Error).message})`);
    }
    file.close();
    this.spilled.set(key, { path, lengths: arrays.map((a) => a.length) });
    this.stats.spilledBytes += bytes;
  }

  /** Every batch's array under `key` (read back when spilled: the caller may keep them). */
  async get(key: string): Promise<Float32Array[]> {
    const kept = this.memory.get(key);
    if (kept) return kept;
    const s = this.entry(key);
    const file = await Deno.open(s.path);
    try {
      const out: Float32Array[] = [];
      for (const n of s.lengths) out.push(await this.readArray(file, s.path, n));
      return out;
    } finally {
      file.close();
    }
  }

  /** Batch `bi`'s array under `key`. */
  async batch(key: string, bi: number): Promise<Float32Array> {
    const kept = this.memory.get(key);
    if (kept) return kept[bi];
    const s = this.entry(key);
    const file = await Deno.open(s.path);
    try {
      let offset = 0;
      for (let i = 0; i < bi; i++) offset += 4 * s.lengths[i];
      await file.seek(offset, Deno.SeekMode.Start);
      return await this.readArray(file, s.path, s.lengths[bi]);
    } finally {
      file.close();
    }
  }

  delete(key: string): void {
    const kept = this.memory.get(key);
    if (kept) {
      this.stats.memoryBytes -= kept.reduce((n, a) => n + a.byteLength, 0);
      this.memory.delete(key);
    }
    const s = this.spilled.get(key);
    if (s) {
      Deno.removeSync(s.path);
      this.spilled.delete(key);
    }
  }

  /** Drop everything and remove the spill folder. */
  close(): void {
    for (const key of [...this.memory.keys(), ...this.spilled.keys()]) this.delete(key);
    if (this.dir !== null) {
      Deno.removeSync(this.dir, { recursive: true });
      globalThis.removeEventListener("unload", this.removeOnExit);
      this.dir = null;
    }
  }

  private entry(key: string): Spilled {
    const s = this.spilled.get(key);
    if (!s) throw new Error(`activation store: nothing under "${key}"`);
    return s;
  }

  private async readArray(file: Deno.FsFile, path: string, n: number): Promise<Float32Array> {
    const out = new Float32Array(n), bytes = new Uint8Array(out.buffer);
    for (let got = 0; got < bytes.length;) {
      const r = await file.read(bytes.subarray(got));
      if (r === null) {
        throw new SpillError(path, `spill file ends early (${got} of ${bytes.length})`);
      }
      got += r;
    }
    this.stats.readBytes += bytes.length;
    return out;
  }
}
