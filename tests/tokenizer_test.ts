import assert from "node:assert";
import { loadTokenizer } from "../lib/io/tokenizer.ts";
import { DEFAULT_MODEL } from "./golden.ts";

Deno.test("default model tokenizer: byte-level ids, specials from tokenizer_config.json", async () => {
  const tok = await loadTokenizer(DEFAULT_MODEL);
  assert.deepEqual(tok.encode("Hi é"), [72, 105, 32, 195, 169]);
  assert.equal(tok.decode([72, 105, 32, 195, 169]), "Hi é");
  assert.deepEqual([tok.bosId, tok.eosId, tok.padId, tok.addBos, tok.addEos], [
    256,
    257,
    258,
    false,
    false,
  ]);
  assert.equal(tok.decode([256, 72], true), "H");
});

Deno.test("add_bos_token / add_eos_token in tokenizer_config.json are honoured", async () => {
  const dir = await Deno.makeTempDir();
  await Deno.copyFile(`${DEFAULT_MODEL}/tokenizer.json`, `${dir}/tokenizer.json`);
  const config = JSON.parse(await Deno.readTextFile(`${DEFAULT_MODEL}/tokenizer_config.json`));
  await Deno.writeTextFile(
    `${dir}/tokenizer_config.json`,
    JSON.stringify({ ...config, add_bos_token: true, add_eos_token: true }),
  );
  const tok = await loadTokenizer(dir);
  assert.deepEqual(tok.encode("ab"), [256, 97, 98, 257]);
  assert.deepEqual(tok.encode("ab", false), [97, 98]);
});

Deno.test("tokenizer errors name the file", async () => {
  const dir = await Deno.makeTempDir();
  await Deno.writeTextFile(`${dir}/tokenizer.json`, "{ broken");
  await assert.rejects(loadTokenizer(dir), /tokenizer\.json: malformed JSON/);
  await Deno.copyFile(`${DEFAULT_MODEL}/tokenizer.json`, `${dir}/tokenizer.json`);
  await Deno.writeTextFile(
    `${dir}/tokenizer_config.json`,
    JSON.stringify({ bos_token: "<|nope|>" }),
  );
  await assert.rejects(
    loadTokenizer(dir),
    /tokenizer_config\.json: bos_token "<\|nope\|>" is not in the vocabulary/,
  );
});
