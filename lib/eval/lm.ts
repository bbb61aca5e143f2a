// The three request types of lm-evaluation-harness, answered by a Model on any Backend:
// loglikelihood, loglikelihood_rolling and greedy generate_until. Batching follows HFLM:
// requests sorted longest first, right-padded to the longest in a batch (causal attention
// means padding never changes real positions), results returned in the original order.

import type { Model } from "../model/model.ts";
import { forward } from "../model/decoder.ts";
import { greedyGenerate } from "../model/generate.ts";
import { argmaxRow } from "../backend/backend.ts";
import {
  encodeRequest,
  getRollingTokenWindows,
  makeDisjointWindow,
  modelInput,
  prefixTokenId,
} from "./requests.ts";

export interface LoglikelihoodRequest {
  context: string;
  continuation: string;
}

export interface LoglikelihoodResult {
  /** Sum of the continuation tokens' log-probabilities (natural log). */
  logprob: number;
  /** Every continuation token is the argmax of its position. */
  isGreedy: boolean;
  /** The input was cut from the left to fit the model's maximum length. */
  truncated: boolean;
}

export interface GenerateRequest {
  context: string;
  until: string[];
  maxGenToks?: number;
}

/** What the evaluator needs from a language model; tests plug in a fake. */
export interface LanguageModel {
  readonly maxLength: number;
  loglikelihood(requests: LoglikelihoodRequest[]): Promise<LoglikelihoodResult[]>;
  /** One summed log-likelihood per text (rolling windows never need truncation). */
  loglikelihoodRolling(texts: string[]): Promise<number[]>;
  generateUntil(requests: GenerateRequest[]): Promise<string[]>;
}

export interface TokenizerLike {
  encode(text: string, special?: boolean): number[];
  decode(ids: number[], skipSpecial?: boolean): string;
  bosId: number | null;
  eosId: number | null;
}

export interface ModelLMOptions {
  /** Longest model input; the harness default is the config's max_position_embeddings. */
  maxLength?: number;
  batchSize?: number;
  /** HFLM add_bos_token=True: encode with the tokenizer's special tokens (BOS) added. */
  addBos?: boolean;
  /** Called after each batch with (tokens done, tokens total) for progress output. */
  onProgress?: (done: number, total: number) => void;
}

export interface TokenRequest {
  context: number[];
  continuation: number[];
}

export class ModelLM implements LanguageModel {
  readonly maxLength: number;
  readonly batchSize: number;
  readonly prefixToken: number;
  /** Forward passes run and tokens fed (padding included), for throughput reports. */
  stats = { batches: 0, tokens: 0, paddedTokens: 0 };

  constructor(
    readonly model: Model,
    readonly tokenizer: TokenizerLike,
    readonly opts: ModelLMOptions = {},
  ) {
    this.maxLength = opts.maxLength ?? model.spec.maxPositions;
    this.batchSize = opts.batchSize ?? 1;
    this.prefixToken = prefixTokenId(tokenizer.bosId, tokenizer.eosId);
  }

  /** HFLM.tok_encode: special tokens only when add_bos_token is set. */
  encode(text: string): number[] {
    if (!this.opts.addBos) return this.tokenizer.encode(text, false);
    const ids = this.tokenizer.encode(text, true);
    const bos = this.tokenizer.bosId;
    return bos !== null && ids[0] !== bos ? [bos, ...ids] : ids;
  }

  loglikelihood(requests: LoglikelihoodRequest[]): Promise<LoglikelihoodResult[]> {
    const encode = (s: string) => this.encode(s);
    return this.loglikelihoodTokens(
      requests.map((r) => encodeRequest(encode, this.prefixToken, r.context, r.continuation)),
    );
  }

  async loglikelihoodRolling(texts: string[]): Promise<number[]> {
    // All windows of all texts go through one batched call; each text sums its windows.
    const windows: TokenRequest[] = [], owner: number[] = [];
    texts.forEach((text, i) => {
      const tokens = this.encode(text);
      for (const w of getRollingTokenWindows(tokens, this.prefixToken, this.maxLength, 1)) {
        const [context, continuation] = makeDisjointWindow(w);
        windows.push({ context, continuation });
        owner.push(i);
      }
    });
    const results = await this.loglikelihoodTokens(windows);
    const sums = new Array(texts.length).fill(0);
    results.forEach((r, j) => (sums[owner[j]] += r.logprob));
    return sums;
  }

  /** HFLM._loglikelihood_tokens. */
  async loglikelihoodTokens(requests: TokenRequest[]): Promise<LoglikelihoodResult[]> {
    const vocab = this.model.spec.vocab;
    const results: LoglikelihoodResult[] = new Array(requests.length);
    // Requests whose model inputs are identical share one forward row (the harness's
    // logits cache does this for one-token continuations; the scores are the same).
    const groups = new Map<string, { input: number[]; members: number[] }>();
    const truncated: boolean[] = [];
    requests.forEach((r, i) => {
      if (r.continuation.length === 0) throw new Error(`request ${i}: empty continuation`);
      if (r.continuation.length > this.maxLength) {
        throw new Error(
          `request ${i}: continuation of ${r.continuation.length} tokens exceeds max length ${this.maxLength}`,
        );
      }
      const { input, truncated: cut } = modelInput(r.context, r.continuation, this.maxLength);
      truncated[i] = cut;
      const key = input.join(",");
      const g = groups.get(key);
      if (g) g.members.push(i);
      else groups.set(key, { input, members: [i] });
    });
    // Longest first, like the harness's Collator (-len(tokens), tokens).
    const order = [...groups.values()].sort((a, b) => b.input.length - a.input.length);
    const total = order.reduce((s, g) => s + g.input.length, 0);
    let done = 0;
    for (let start = 0; start < order.length; start += this.batchSize) {
      const chunk = order.slice(start, start + this.batchSize);
      const padLen = chunk[0].input.length;
      const ids = new Int32Array(chunk.length * padLen); // right padding with token 0
      chunk.forEach((g, b) => ids.set(g.input, b * padLen));
      // Only the rows that predict a continuation token go through the LM head.
      const logitRow = new Map<number, number>(); // row of the batch -> row of the logits
      chunk.forEach((g, b) => {
        for (const i of g.members) {
          const first = b * padLen + g.input.length - requests[i].continuation.length;
          for (let row = first; row < b * padLen + g.input.length; row++) {
            if (!logitRow.has(row)) logitRow.set(row, logitRow.size);
          }
        }
      });
      const { logits } = await forward(this.model, ids, { batch: chunk.length, seqLen: padLen }, {
        logitRows: Int32Array.from(logitRow.keys()),
      });
      this.stats.batches++;
      this.stats.tokens += chunk.reduce((s, g) => s + g.input.length, 0);
      this.stats.paddedTokens += ids.length;
      chunk.forEach((g, b) => {
        const inplen = g.input.length;
        for (const i of g.members) {
          const cont = requests[i].continuation;
          let logprob = 0, isGreedy = true;
          for (let j = 0; j < cont.length; j++) {
            // The logits at position p predict token p + 1; the continuation's are the last ones.
            const row = logitRow.get(b * padLen + inplen - cont.length + j)!;
            logprob += logSoftmaxAt(logits, row, vocab, cont[j]);
            if (argmaxRow(logits, row, vocab) !== cont[j]) isGreedy = false;
          }
          results[i] = { logprob, isGreedy, truncated: truncated[i] };
        }
        done += inplen;
      });
      this.opts.onProgress?.(done, total);
    }
    return results;
  }

  /**
   * HFLM.generate_until, greedy. The context keeps its last (maxLength - maxGenToks)
   * tokens; generation stops at EOS or once any `until` string appears, and the text is
   * cut at the first occurrence of each stop string. Batches hold contexts of equal
   * token length (we have no attention mask for left padding), longest first.
   */
  async generateUntil(requests: GenerateRequest[]): Promise<string[]> {
    const eos = this.tokenizer.eosId;
    const eosText = eos === null ? null : this.tokenizer.decode([eos], false);
    const prepared = requests.map((r, i) => {
      const maxGen = r.maxGenToks ?? 256;
      const until = [...r.until];
      if (eosText !== null) until.push(eosText);
      const maxCtx = this.maxLength - maxGen;
      if (maxCtx < 1) {
        throw new Error(`request ${i}: max_gen_toks ${maxGen} leaves no room for context`);
      }
      let ctx = r.context === "" ? [this.prefixToken] : this.encode(r.context);
      if (ctx.length > maxCtx) ctx = ctx.slice(ctx.length - maxCtx);
      return { i, ctx, maxGen, until };
    });
    const outputs: string[] = new Array(requests.length);
    const order = [...prepared].sort((a, b) => b.ctx.length - a.ctx.length);
    for (let start = 0; start < order.length;) {
      const first = order[start];
      let end = start + 1;
      while (
        end < order.length && end - start < this.batchSize &&
        order[end].ctx.length === first.ctx.length && order[end].maxGen === first.maxGen
      ) end++;
      const batch = order.slice(start, end);
      const generated = await greedyGenerate(this.model, batch.map((p) => p.ctx), {
        maxNewTokens: first.maxGen,
        shouldStop: (b, toks) => {
          if (eos !== null && toks[toks.length - 1] === eos) return true;
          const text = this.tokenizer.decode(toks, false);
          return batch[b].until.some((u) => u.length > 0 && text.includes(u));
        },
      });
      batch.forEach((p, b) => {
        let text = this.tokenizer.decode(generated[b], false);
        for (const term of p.until) if (term.length > 0) text = text.split(term)[0];
        outputs[p.i] = text;
      });
      start = end;
    }
    return outputs;
  }
}

/** log_softmax(logits[row])[token], in float64. */
export function logSoftmaxAt(
  logits: Float32Array,
  row: number,
  vocab: number,
  token: number,
): number {
  const o = row * vocab;
  let max = -Infinity;
  for (let j = 0; j < vocab; j++) if (logits[o + j] > max) max = logits[o + j];
  let sum = 0;
  for (let j = 0; j < vocab; j++) sum += Math.exp(logits[o + j] - max);
  return logits[o + token] - max - Math.log(sum);
}
