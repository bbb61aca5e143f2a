// safetensors: [u64 LE header length N][N bytes JSON header][data block].
// The reader parses and validates only the header; tensor bytes are read on demand
// from their byte range, so a multi-GB shard is never loaded whole.

export type DType = "F64" | "F32" | "F16" | "BF16" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL";

export const DTYPE_BYTES: Record<DType, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** Absolute byte range in the file. */
  begin: number;
  end: number;
}

/** A tensor's raw little-endian bytes in its file dtype. */
export interface RawTensor {
  name: string;
  dtype: DType;
  shape: number[];
  bytes: Uint8Array;
}

export class SafetensorsError extends Error {
  constructor(path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "SafetensorsError";
  }
}

// Bound on the header size, as the Rust reference implementation does, so a corrupt
// length field cannot make us allocate gigabytes.
const MAX_HEADER_BYTES = 100_000_000;

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Parse and validate a header; `fileSize` bounds the offsets. */
export function parseHeader(
  path: string,
  headerBytes: Uint8Array,
  fileSize: number,
): { tensors: Map<string, TensorInfo>; metadata: Record<string, string> } {
  const dataStart = 8 + headerBytes.length;
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes));
  } catch (e) {
    throw new SafetensorsError(path, `header is not valid UTF-8 JSON (${(e as Error).message})`);
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) {
    throw new SafetensorsError(path, "header is not a JSON object");
  }
  const tensors = new Map<string, TensorInfo>();
  let metadata: Record<string, string> = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") {
      metadata = entry as Record<string, string>;
      continue;
    }
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e !== "object" || e === null) {
      throw new SafetensorsError(path, `tensor "${name}": header entry is not an object`);
    }
    if (typeof e.dtype !== "string" || !(e.dtype in DTYPE_BYTES)) {
      throw new SafetensorsError(
        path,
        `tensor "${name}": unknown dtype ${JSON.stringify(e.dtype)}`,
      );
    }
    const dtype = e.dtype as DType;
    if (
      !Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && d >= 0)
    ) {
      throw new SafetensorsError(path, `tensor "${name}": bad shape ${JSON.stringify(e.shape)}`);
    }
    const offs = e.data_offsets;
    if (
      !Array.isArray(offs) || offs.length !== 2 ||
      !offs.every((o) => Number.isSafeInteger(o) && o >= 0) || offs[1] < offs[0]
    ) {
      throw new SafetensorsError(
        path,
        `tensor "${name}": bad data_offsets ${JSON.stringify(offs)}`,
      );
    }
    const shape = e.shape as number[];
    const expected = numel(shape) * DTYPE_BYTES[dtype];
    if (offs[1] - offs[0] !== expected) {
      throw new SafetensorsError(
        path,
        `tensor "${name}": shape [${shape}] of ${dtype} needs ${expected} bytes but data_offsets ` +
          `span ${offs[1] - offs[0]}`,
      );
    }
    const begin = dataStart + offs[0], end = dataStart + offs[1];
    if (end > fileSize) {
      throw new SafetensorsError(
        path,
        `tensor "${name}": data_offsets [${offs}] run past the end of the file ` +
          `(data block is ${fileSize - dataStart} bytes; file truncated?)`,
      );
    }
    tensors.set(name, { name, dtype, shape, begin, end });
  }
  // Tensors must not overlap (the format also requires no holes; we only warn-free reject overlap).
  const sorted = [...tensors.values()].sort((a, b) => a.begin - b.begin);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i].begin < sorted[i - 1].end) {
      throw new SafetensorsError(
        path,
        `tensors "${sorted[i - 1].name}" and "${sorted[i].name}" overlap in the data block`,
      );
    }
  }
  return { tensors, metadata };
}

/** An open safetensors file; tensors are read lazily by byte range. */
export class SafetensorsFile {
  private constructor(
    readonly path: string,
    private file: Deno.FsFile,
    readonly tensors: Map<string, TensorInfo>,
    readonly metadata: Record<string, string>,
  ) {}

  static async open(path: string): Promise<SafetensorsFile> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { read: true });
    } catch (e) {
      throw new SafetensorsError(path, `cannot open (${(e as Error).message})`);
    }
    try {
      const size = (await file.stat()).size;
      if (size < 8) {
        throw new SafetensorsError(path, `file is ${size} bytes, too short for a header`);
      }
      const lenBytes = await readExactly(file, 0, 8, path);
      const headerLen = Number(new DataView(lenBytes.buffer).getBigUint64(0, true));
      if (headerLen > MAX_HEADER_BYTES) {
        throw new SafetensorsError(path, `header length ${headerLen} is implausibly large`);
      }
      if (8 + headerLen > size) {
        throw new SafetensorsError(
          path,
          `header length ${headerLen} runs past the end of the ${size}-byte file`,
        );
      }
      const headerBytes = await readExactly(file, 8, headerLen, path);
      const { tensors, metadata } = parseHeader(path, headerBytes, size);
      return new SafetensorsFile(path, file, tensors, metadata);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new SafetensorsError(this.path, `no tensor named "${name}"`);
    return t;
  }

  // seek + read on one handle is not atomic: concurrent reads are queued.
  private queue: Promise<unknown> = Promise.resolve();

  read(name: string): Promise<RawTensor> {
    const t = this.info(name);
    const next = this.queue.then(() => readExactly(this.file, t.begin, t.end - t.begin, this.path));
    this.queue = next.catch(() => {});
    return next.then((bytes) => ({ name, dtype: t.dtype, shape: t.shape, bytes }));
  }

  close(): void {
    this.file.close();
  }
}

async function readExactly(
  file: Deno.FsFile,
  offset: number,
  length: number,
  path: string,
): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  await file.seek(offset, Deno.SeekMode.Start);
  let got = 0;
  while (got < length) {
    const n = await file.read(out.subarray(got));
    if (n === null) {
      throw new SafetensorsError(
        path,
        `unexpected end of file reading bytes ${offset}..${offset + length}`,
      );
    }
    got += n;
  }
  return out;
}

// ---- conversion helpers ---------------------------------------------------------------

/** Widen a float tensor of any float dtype to f32 (bf16: upper half of the f32 pattern). */
export function toFloat32(t: RawTensor): Float32Array {
  const n = numel(t.shape);
  const aligned = t.bytes.byteOffset % 4 === 0 ? t.bytes : t.bytes.slice();
  switch (t.dtype) {
    case "F32":
      return new Float32Array(aligned.buffer, aligned.byteOffset, n).slice();
    case "BF16": {
      const src = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
      const out = new Uint32Array(n);
      for (let i = 0; i < n; i++) out[i] = src[i] << 16;
      return new Float32Array(out.buffer);
    }
    case "F16": {
      const src = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = f16ToF32(src[i]);
      return out;
    }
    case "F64": {
      const a8 = t.bytes.byteOffset % 8 === 0 ? t.bytes : t.bytes.slice();
      return Float32Array.from(new Float64Array(a8.buffer, a8.byteOffset, n));
    }
    default:
      throw new Error(`tensor "${t.name}": dtype ${t.dtype} is not a float type`);
  }
}

/** Read an integer tensor (I32/I64/U8/...) as Int32Array. */
export function toInt32(t: RawTensor): Int32Array {
  const n = numel(t.shape);
  const b = t.bytes.slice();
  const dv = new DataView(b.buffer);
  const out = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    switch (t.dtype) {
      case "I32":
        out[i] = dv.getInt32(4 * i, true);
        break;
      case "I64":
        out[i] = Number(dv.getBigInt64(8 * i, true));
        break;
      case "I16":
        out[i] = dv.getInt16(2 * i, true);
        break;
      case "I8":
        out[i] = dv.getInt8(i);
        break;
      case "U8":
      case "BOOL":
        out[i] = dv.getUint8(i);
        break;
      default:
        throw new Error(`tensor "${t.name}": dtype ${t.dtype} is not an integer type`);
    }
  }
  return out;
}

export function f16ToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** Round f32 to bf16 bits, nearest-even (as PyTorch does). */
export function f32ToBf16Bits(x: Float32Array): Uint16Array {
  const u = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const out = new Uint16Array(x.length);
  for (let i = 0; i < u.length; i++) {
    const v = u[i];
    if ((v & 0x7f800000) === 0x7f800000 && (v & 0x7fffff)) out[i] = (v >>> 16) | 0x40; // NaN
    else out[i] = (v + 0x7fff + ((v >>> 16) & 1)) >>> 16;
  }
  return out;
}

// ---- writer -------------------------------------------------------------------------

/**
 * A tensor to write whose bytes are made only when the writer reaches it, so a writer
 * holds one tensor at a time, not the file (a condensed layer, a synthesized expert).
 */
export interface LazyTensor {
  name: string;
  dtype: DType;
  shape: number[];
  bytes: () => Promise<Uint8Array> | Uint8Array;
}

/** A RawTensor as a LazyTensor (its bytes are already there). */
export function lazyOf(t: RawTensor): LazyTensor {
  return { name: t.name, dtype: t.dtype, shape: t.shape, bytes: () => t.bytes };
}

/** Bytes a tensor of this dtype and shape takes in the data block. */
export function tensorBytes(t: { dtype: DType; shape: readonly number[] }): number {
  return numel(t.shape) * DTYPE_BYTES[t.dtype];
}

/**
 * Write tensors in sorted-name order with an 8-byte aligned data block, to `path.tmp`
 * then rename, so a killed writer never leaves a half-written file under the real name.
 */
export function writeSafetensors(
  path: string,
  tensors: RawTensor[],
  metadata: Record<string, string> = { format: "pt" },
): Promise<void> {
  return writeSafetensorsLazy(path, tensors.map(lazyOf), metadata);
}

/**
 * writeSafetensors for tensors made one at a time: the header comes from the shapes, then
 * each tensor's bytes are made, checked against its shape and written. A failed write (a
 * full disk) is an error naming the file, and its temp file is removed.
 */
export async function writeSafetensorsLazy(
  path: string,
  tensors: LazyTensor[],
  metadata: Record<string, string> = { format: "pt" },
): Promise<void> {
  const sorted = [...tensors].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of sorted) {
    if (t.name in header) throw new SafetensorsError(path, `duplicate tensor name "${t.name}"`);
    const size = tensorBytes(t);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + new TextEncoder().encode(json).length) % 8)) % 8);
  const headerBytes = new TextEncoder().encode(json);
  const tmp = `${path}.tmp`;
  const file = await Deno.open(tmp, { write: true, create: true, truncate: true });
  let written = 0;
  const write = async (bytes: Uint8Array) => {
    try {
      await writeAll(file, bytes);
    } catch (e) {
      throw new SafetensorsError(
        path,
        `write failed after ${written} of ${8 + headerBytes.length + offset} bytes ` +
          `(${(e as Error).message})`,
      );
    }
    written += bytes.length;
  };
  try {
    try {
      const len = new Uint8Array(8);
      new DataView(len.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
      await write(len);
      await write(headerBytes);
      for (const t of sorted) {
        const bytes = await t.bytes();
        const expected = tensorBytes(t);
        if (bytes.length !== expected) {
          throw new SafetensorsError(
            path,
            `tensor "${t.name}": ${bytes.length} bytes given for shape [${t.shape}] of ` +
              `${t.dtype} (${expected} expected)`,
          );
        }
        await write(bytes);
      }
    } finally {
      file.close();
    }
    await Deno.rename(tmp, path);
  } catch (e) {
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  // In pieces of at most 64 MiB: one write() of a large buffer may be split anyway.
  let done = 0;
  while (done < bytes.length) {
    done += await file.write(bytes.subarray(done, done + 2 ** 26));
  }
}

/** Helpers to build RawTensors for writing. */
export function f32Tensor(name: string, shape: number[], data: Float32Array): RawTensor {
  return {
    name,
    dtype: "F32",
    shape,
    bytes: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
  };
}

export function i32Tensor(name: string, shape: number[], data: Int32Array): RawTensor {
  return {
    name,
    dtype: "I32",
    shape,
    bytes: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
  };
}
