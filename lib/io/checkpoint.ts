// A Hugging Face model folder: config.json, model.safetensors or a sharded
// model.safetensors.index.json, tokenizer files. Weights are opened lazily.

import {
  lazyOf,
  type LazyTensor,
  type RawTensor,
  SafetensorsError,
  SafetensorsFile,
  tensorBytes,
  type TensorInfo,
  writeSafetensorsLazy,
} from "./safetensors.ts";

export class CheckpointError extends Error {
  constructor(path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "CheckpointError";
  }
}

export interface Checkpoint {
  dir: string;
  config: Record<string, unknown>;
  /** Tensor name -> the open file that holds it. */
  files: Map<string, SafetensorsFile>;
  /** Files to close. */
  shards: SafetensorsFile[];
  /** The shard index, when the weights are sharded. */
  index?: string;
}

export async function readJson(path: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new CheckpointError(path, `cannot read (${(e as Error).message})`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new CheckpointError(path, `malformed JSON (${(e as Error).message})`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new CheckpointError(path, "expected a JSON object");
  }
  return value as Record<string, unknown>;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

export async function openCheckpoint(dir: string): Promise<Checkpoint> {
  const config = await readJson(`${dir}/config.json`);
  const files = new Map<string, SafetensorsFile>();
  const shards: SafetensorsFile[] = [];
  const indexPath = `${dir}/model.safetensors.index.json`;
  let index: string | undefined;
  try {
    if (await exists(indexPath)) {
      index = indexPath;
      const weightMap = await readWeightMap(indexPath);
      const byShard = new Map<string, SafetensorsFile>();
      for (const shardName of new Set(weightMap.values())) {
        try {
          const shard = await SafetensorsFile.open(`${dir}/${shardName}`);
          byShard.set(shardName, shard);
          shards.push(shard);
        } catch (e) {
          if (!(await exists(`${dir}/${shardName}`))) {
            throw new CheckpointError(indexPath, `names shard ${shardName}, which is missing`);
          }
          throw e;
        }
      }
      for (const [name, shardName] of weightMap) {
        const shard = byShard.get(shardName)!;
        if (!shard.tensors.has(name)) {
          throw new CheckpointError(
            indexPath,
            `tensor "${name}" is mapped to ${shardName}, which does not contain it`,
          );
        }
        files.set(name, shard);
      }
      // A tensor stored twice is ambiguous: which copy the index meant cannot be checked.
      for (const shard of shards) {
        for (const name of shard.tensors.keys()) {
          const mapped = files.get(name);
          if (mapped && mapped !== shard) {
            throw new CheckpointError(
              indexPath,
              `tensor "${name}" is in both ${baseName(mapped.path)} and ${baseName(shard.path)}`,
            );
          }
        }
      }
    } else if (await exists(`${dir}/model.safetensors`)) {
      const file = await SafetensorsFile.open(`${dir}/model.safetensors`);
      shards.push(file);
      for (const name of file.tensors.keys()) files.set(name, file);
    } else {
      throw new CheckpointError(dir, "no model.safetensors or model.safetensors.index.json");
    }
  } catch (e) {
    for (const s of shards) s.close();
    throw e;
  }
  return { dir, config, files, shards, index };
}

function baseName(path: string): string {
  return path.slice(path.lastIndexOf("/") + 1);
}

/**
 * The index's tensor -> shard map, checked: shard names are plain file names, no tensor is
 * named twice (JSON.parse would silently keep the last), and shards numbered "-of-N" are
 * all there (a shard missing from the index would leave its tensors unread).
 */
async function readWeightMap(indexPath: string): Promise<Map<string, string>> {
  const index = await readJson(indexPath);
  const weightMap = index.weight_map as Record<string, unknown> | undefined;
  if (!weightMap || typeof weightMap !== "object" || Array.isArray(weightMap)) {
    throw new CheckpointError(indexPath, `missing "weight_map" object`);
  }
  const twice = duplicateWeightMapKeys(await Deno.readTextFile(indexPath));
  if (twice.length > 0) {
    throw new CheckpointError(
      indexPath,
      `"weight_map" names tensor "${twice[0]}" more than once` +
        (twice.length > 1 ? ` (and ${twice.length - 1} more)` : ""),
    );
  }
  const out = new Map<string, string>();
  for (const [name, shardName] of Object.entries(weightMap)) {
    if (
      typeof shardName !== "string" || shardName === "" || shardName.includes("/") ||
      shardName.includes("\\")
    ) {
      throw new CheckpointError(
        indexPath,
        `tensor "${name}": bad shard name ${JSON.stringify(shardName)}`,
      );
    }
    out.set(name, shardName);
  }
  const numbered = new Map<string, Set<number>>(); // "prefix-of-N" -> shard numbers named
  for (const shardName of new Set(out.values())) {
    const m = /^(.*)-(\d+)-of-(\d+)\.safetensors$/.exec(shardName);
    if (!m) continue;
    const key = `${m[1]}\u0000${m[3]}`;
    if (!numbered.has(key)) numbered.set(key, new Set());
    numbered.get(key)!.add(Number(m[2]));
  }
  for (const [key, named] of numbered) {
    const [prefix, of] = key.split("\u0000"), total = Number(of);
    for (let i = 1; i <= total; i++) {
      if (named.has(i)) continue;
      const missing = `${prefix}-${String(i).padStart(of.length, "0")}-of-${of}.safetensors`;
      throw new CheckpointError(
        indexPath,
        `names no tensor in ${missing}: shard ${i} of ${total} is missing from the index`,
      );
    }
  }
  return out;
}

/** Keys that occur more than once in the text's "weight_map" object. */
function duplicateWeightMapKeys(text: string): string[] {
  const start = /"weight_map"\s*:\s*\{/.exec(text);
  if (!start) return [];
  const token = /"(?:[^"\\]|\\.)*"|[{}[\]:]/g;
  token.lastIndex = start.index + start[0].length - 1;
  const seen = new Set<string>(), twice: string[] = [];
  let depth = 0, last = "";
  for (let m = token.exec(text); m; m = token.exec(text)) {
    const t = m[0];
    if (t === "{" || t === "[") depth++;
    else if (t === "}" || t === "]") {
      if (--depth === 0) break;
    } else if (t === ":" && depth === 1 && last.startsWith('"')) {
      const key = JSON.parse(last) as string;
      if (seen.has(key)) twice.push(key);
      seen.add(key);
    }
    last = t;
  }
  return twice;
}

export function tensorInfo(ckpt: Checkpoint, name: string): TensorInfo | undefined {
  return ckpt.files.get(name)?.tensors.get(name);
}

export function readTensor(ckpt: Checkpoint, name: string): Promise<RawTensor> {
  const file = ckpt.files.get(name);
  if (!file) throw new CheckpointError(ckpt.dir, `checkpoint has no tensor "${name}"`);
  return file.read(name);
}

export function closeCheckpoint(ckpt: Checkpoint): void {
  for (const s of ckpt.shards) s.close();
}

// What a derived checkpoint keeps of its source besides weights and config: the tokenizer
// and the generation settings, where the source has them.
const SIDECAR_FILES = [
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "generation_config.json",
];

/** The largest shard Hugging Face's save_pretrained writes by default ("5GB"). */
export const HF_MAX_SHARD_BYTES = 5e9;

/** How weights are split into files. */
export interface WeightsLayout {
  /** Largest shard (a single tensor larger than this gets a shard of its own). */
  maxShardBytes?: number;
  /** Write shards and an index even when everything fits in one file. */
  sharded?: boolean;
}

/**
 * Write weights into `dir` as save_pretrained does: in the given order, a new shard
 * whenever the next tensor would pass maxShardBytes; one model.safetensors when they fit
 * in one (unless `sharded`), else model-0000i-of-0000n.safetensors and
 * model.safetensors.index.json. Tensors are made one at a time (LazyTensor). Returns the
 * files written.
 */
export async function writeWeights(
  dir: string,
  tensors: (LazyTensor | RawTensor)[],
  layout: WeightsLayout = {},
): Promise<string[]> {
  const max = layout.maxShardBytes ?? HF_MAX_SHARD_BYTES;
  const lazy = tensors.map((t) => (t.bytes instanceof Uint8Array ? lazyOf(t as RawTensor) : t));
  const groups: LazyTensor[][] = [[]];
  let size = 0, total = 0;
  for (const t of lazy as LazyTensor[]) {
    const bytes = tensorBytes(t);
    if (size + bytes > max && groups.at(-1)!.length > 0) (groups.push([]), (size = 0));
    groups.at(-1)!.push(t);
    size += bytes, total += bytes;
  }
  if (groups.length === 1 && !layout.sharded) {
    await writeSafetensorsLazy(`${dir}/model.safetensors`, groups[0]);
    return ["model.safetensors"];
  }
  const n = String(groups.length).padStart(5, "0");
  const names = groups.map((_, i) => `model-${String(i + 1).padStart(5, "0")}-of-${n}.safetensors`);
  const weightMap: Record<string, string> = {};
  const entries = groups.flatMap((g, i) => g.map((t) => [t.name, names[i]] as const));
  for (const [name, file] of entries.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))) {
    if (name in weightMap) throw new CheckpointError(dir, `tensor "${name}" given twice`);
    weightMap[name] = file;
  }
  for (const [i, g] of groups.entries()) await writeSafetensorsLazy(`${dir}/${names[i]}`, g);
  const index = { metadata: { total_size: total }, weight_map: weightMap };
  await writeTextNamed(
    `${dir}/model.safetensors.index.json`,
    JSON.stringify(index, null, 2) + "\n",
  );
  return [...names, "model.safetensors.index.json"];
}

/** Write a text file; a failure (a full disk) is an error naming it. */
export async function writeTextNamed(path: string, text: string): Promise<void> {
  try {
    await Deno.writeTextFile(path, text);
  } catch (e) {
    throw new CheckpointError(path, `write failed (${(e as Error).message})`);
  }
}

/** writeWeights into the folder being written, with the layout chosen for it. */
export type WeightsWriter = (tensors: (LazyTensor | RawTensor)[]) => Promise<string[]>;

/**
 * Writes a checkpoint folder derived from `source` at `outDir`: `fill` writes the weights
 * (through `weights`: sharded like the source, or when larger than one shard) and
 * config.json into a temporary folder beside it, the source's tokenizer files are copied
 * in, and the folder is renamed into place (replacing an old `outDir`), so a failure
 * leaves no partial output.
 */
export async function writeCheckpointFolder(
  source: Checkpoint,
  outDir: string,
  fill: (tmp: string, weights: WeightsWriter) => Promise<void>,
  layout: WeightsLayout = {},
): Promise<void> {
  await writeFolder(outDir, async (tmp) => {
    const weights: WeightsWriter = (tensors) =>
      writeWeights(tmp, tensors, { sharded: source.index !== undefined, ...layout });
    await fill(tmp, weights);
    for (const f of SIDECAR_FILES) {
      try {
        await Deno.copyFile(`${source.dir}/${f}`, `${tmp}/${f}`);
      } catch (e) {
        if (e instanceof Deno.errors.NotFound) continue;
        throw new CheckpointError(`${tmp}/${f}`, `copy failed (${(e as Error).message})`);
      }
    }
  });
}

/**
 * Write a folder at `outDir` through `fill` into a temporary folder beside it, renamed into
 * place (replacing an old `outDir`) only when `fill` succeeded: a failure leaves no partial
 * output.
 */
export async function writeFolder(
  outDir: string,
  fill: (tmp: string) => Promise<void>,
): Promise<void> {
  const tmp = `${outDir.replace(/\/+$/, "")}.tmp-${Deno.pid}`;
  await Deno.remove(tmp, { recursive: true }).catch(() => {});
  await Deno.mkdir(tmp, { recursive: true });
  try {
    await fill(tmp);
    await Deno.remove(outDir, { recursive: true }).catch(() => {});
    await Deno.rename(tmp, outDir);
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw e;
  }
}

export { SafetensorsError };
