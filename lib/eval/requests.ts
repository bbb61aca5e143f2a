// How lm-evaluation-harness turns requests into tokens (HFLM, causal models):
// context/continuation pairs, the prefix token for empty contexts, and the rolling
// windows of loglikelihood_rolling (utils.get_rolling_token_windows + make_disjoint_window).

export interface EncodeFn {
  (text: string): number[];
}

/** HFLM._encode_pair: trailing whitespace of the context moves to the continuation. */
export function encodePair(
  encode: EncodeFn,
  context: string,
  continuation: string,
): { context: number[]; continuation: number[] } {
  const nSpaces = context.length - context.trimEnd().length;
  if (nSpaces > 0) {
    continuation = context.slice(context.length - nSpaces) + continuation;
    context = context.slice(0, context.length - nSpaces);
  }
  const whole = encode(context + continuation);
  const ctx = encode(context);
  return { context: ctx, continuation: whole.slice(ctx.length) };
}

/** HFLM.loglikelihood: an empty context becomes [prefix token] and the continuation is encoded alone. */
export function encodeRequest(
  encode: EncodeFn,
  prefixToken: number,
  context: string,
  continuation: string,
): { context: number[]; continuation: number[] } {
  if (context === "") return { context: [prefixToken], continuation: encode(continuation) };
  return encodePair(encode, context, continuation);
}

/** HFLM.prefix_token_id: BOS, or EOS when the tokenizer has no BOS. */
export function prefixTokenId(bosId: number | null, eosId: number | null): number {
  const id = bosId ?? eosId;
  if (id === null) {
    throw new Error("tokenizer has neither a BOS nor an EOS token for empty contexts");
  }
  return id;
}

/** Python list slicing a[start:end] (negative indices count from the end, clamped). */
export function pySlice<T>(a: readonly T[], start?: number, end?: number): T[] {
  const n = a.length;
  const norm = (i: number | undefined, dflt: number) => {
    if (i === undefined) return dflt;
    if (i < 0) return Math.max(0, n + i);
    return Math.min(i, n);
  };
  return a.slice(norm(start, 0), norm(end, n));
}

export type TokenWindow = [context: number[], continuation: number[]];

/**
 * utils.get_rolling_token_windows: the first window predicts its tokens from the prefix
 * token; each later window predicts up to maxSeqLen - contextLen + 1 new tokens and is
 * conditioned on the tokens before them, maxSeqLen in all.
 */
export function getRollingTokenWindows(
  tokens: readonly number[],
  prefixToken: number,
  maxSeqLen: number,
  contextLen: number,
): TokenWindow[] {
  if (!(1 <= contextLen && contextLen <= maxSeqLen)) {
    throw new Error(`rolling windows: need 1 <= context_len (${contextLen}) <= max_seq_len`);
  }
  const windows: TokenWindow[] = [];
  if (tokens.length === 0) return windows;
  const predLen = maxSeqLen - contextLen + 1;
  const firstSeqLen = Math.min(maxSeqLen, tokens.length);
  windows.push([[prefixToken, ...tokens.slice(0, firstSeqLen - 1)], tokens.slice(0, firstSeqLen)]);
  let predicted = firstSeqLen;
  while (predicted < tokens.length) {
    const windowPredLen = Math.min(tokens.length - predicted, predLen);
    const windowEnd = predicted + windowPredLen;
    windows.push([
      pySlice(tokens, windowEnd - maxSeqLen - 1, windowEnd - 1),
      pySlice(tokens, windowEnd - windowPredLen, windowEnd),
    ]);
    predicted += windowPredLen;
  }
  return windows;
}

/** utils.make_disjoint_window: drop from the context what the continuation re-predicts. */
export function makeDisjointWindow([a, b]: TokenWindow): TokenWindow {
  return [a.slice(0, a.length - (b.length - 1)), b];
}

/** The model input of one loglikelihood request: (ctx + cont)[-(maxLength + 1):][:-1]. */
export function modelInput(
  context: readonly number[],
  continuation: readonly number[],
  maxLength: number,
) {
  const whole = [...context, ...continuation];
  const kept = whole.slice(Math.max(0, whole.length - (maxLength + 1)));
  return { input: kept.slice(0, -1), truncated: whole.length > maxLength + 1 };
}
