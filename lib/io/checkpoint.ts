// A Hugging Face model folder: config.json, model.safetensors or a sharded
// model.safetensors.index.json, tokenizer files. Weights are opened lazily.

import {
  type RawTensor,
  SafetensorsError,
  SafetensorsFile,
  type TensorInfo,
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
  try {
    const indexPath = `${dir}/model.safetensors.index.json`;
    if (await exists(indexPath)) {
      const index = await readJson(indexPath);
      const weightMap = index.weight_map as Record<string, string> | undefined;
      if (!weightMap || typeof weightMap !== "object") {
        throw new CheckpointError(indexPath, `missing "weight_map" object`);
      }
      const byShard = new Map<string, SafetensorsFile>();
      for (const [name, shardName] of Object.entries(weightMap)) {
        if (typeof shardName !== "string" || shardName.includes("/") || shardName.includes("\\")) {
          throw new CheckpointError(
            indexPath,
            `tensor "${name}": bad shard name ${JSON.stringify(shardName)}`,
          );
        }
        let shard = byShard.get(shardName);
        if (!shard) {
          shard = await SafetensorsFile.open(`${dir}/${shardName}`);
          byShard.set(shardName, shard);
          shards.push(shard);
        }
        if (!shard.tensors.has(name)) {
          throw new CheckpointError(
            indexPath,
            `tensor "${name}" is mapped to ${shardName}, which does not contain it`,
          );
        }
        files.set(name, shard);
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
  return { dir, config, files, shards };
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

/**
 * Writes a checkpoint folder derived from `source` at `outDir`: `fill` writes the weights
 * and config.json into a temporary folder beside it, the source's tokenizer files are
 * copied in, and the folder is renamed into place (replacing an old `outDir`), so a failure
 * leaves no partial output.
 */
export async function writeCheckpointFolder(
  source: Checkpoint,
  outDir: string,
  fill: (tmp: string) => Promise<void>,
): Promise<void> {
  const tmp = `${outDir.replace(/\/+$/, "")}.tmp-${Deno.pid}`;
  await Deno.remove(tmp, { recursive: true }).catch(() => {});
  await Deno.mkdir(tmp, { recursive: true });
  try {
    await fill(tmp);
    for (const f of SIDECAR_FILES) {
      try {
        await Deno.copyFile(`${source.dir}/${f}`, `${tmp}/${f}`);
      } catch (e) {
        if (!(e instanceof Deno.errors.NotFound)) throw e;
      }
    }
    await Deno.remove(outDir, { recursive: true }).catch(() => {});
    await Deno.rename(tmp, outDir);
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw e;
  }
}

export { SafetensorsError };
