// Tokenizer from a local HF folder (tokenizer.json + tokenizer_config.json), honouring
// add_bos_token / add_eos_token the way transformers' fast tokenizers do.

import { Tokenizer } from "@huggingface/tokenizers";
import { CheckpointError, readJson } from "./checkpoint.ts";

export interface TextTokenizer {
  /** Token ids of `text`, with BOS/EOS added when the config says so and `special` is true. */
  encode(text: string, special?: boolean): number[];
  decode(ids: number[], skipSpecial?: boolean): string;
  bosId: number | null;
  eosId: number | null;
  padId: number | null;
  addBos: boolean;
  addEos: boolean;
}

export async function loadTokenizer(dir: string): Promise<TextTokenizer> {
  const json = await readJson(`${dir}/tokenizer.json`);
  const cfgPath = `${dir}/tokenizer_config.json`;
  let config: Record<string, unknown> = {};
  try {
    config = await readJson(cfgPath);
  } catch (e) {
    // A missing tokenizer_config.json is allowed (defaults); a malformed one is not.
    if (!(e instanceof CheckpointError) || !String(e.message).includes("cannot read")) throw e;
  }
  let tok: Tokenizer;
  try {
    tok = new Tokenizer(json, config);
  } catch (e) {
    throw new CheckpointError(
      `${dir}/tokenizer.json`,
      `cannot build tokenizer (${(e as Error).message})`,
    );
  }
  const tokenId = (key: string): number | null => {
    const v = config[key];
    const content = typeof v === "string" ? v : (v as { content?: string } | null)?.content;
    if (typeof content !== "string") return null;
    const id = tok.token_to_id(content);
    if (id === undefined || id === null) {
      throw new CheckpointError(cfgPath, `${key} "${content}" is not in the vocabulary`);
    }
    return id;
  };
  const bosId = tokenId("bos_token"), eosId = tokenId("eos_token"), padId = tokenId("pad_token");
  // transformers' LlamaTokenizerFast defaults add_bos_token to true; PreTrainedTokenizerFast
  // (no such key) adds nothing beyond what tokenizer.json's post-processor does.
  const addBos = config.add_bos_token === true, addEos = config.add_eos_token === true;
  return {
    bosId,
    eosId,
    padId,
    addBos,
    addEos,
    encode(text: string, special = true): number[] {
      // The post-processor of tokenizer.json may add specials itself; we add only what the
      // config asks for and that is not already there.
      const ids = [...tok.encode(text, { add_special_tokens: special }).ids];
      if (special && addBos && bosId !== null && ids[0] !== bosId) ids.unshift(bosId);
      if (special && addEos && eosId !== null && ids[ids.length - 1] !== eosId) ids.push(eosId);
      return ids;
    },
    decode(ids: number[], skipSpecial = false): string {
      return tok.decode(ids, { skip_special_tokens: skipSpecial });
    },
  };
}
