// Metrics and their standard errors as lm-evaluation-harness aggregates them.

export function mean(xs: readonly number[]): number {
  let s = 0;
  for (const x of xs) s += x;
  return s / xs.length;
}

/** Sample standard deviation (n - 1) / sqrt(n): the harness's mean_stderr. */
export function meanStderr(xs: readonly number[]): number {
  const n = xs.length;
  if (n < 2) return NaN;
  const mu = mean(xs);
  let ss = 0;
  for (const x of xs) ss += (x - mu) * (x - mu);
  return Math.sqrt(ss / (n - 1)) / Math.sqrt(n);
}

/** acc and acc_norm of one multiple-choice doc from its per-choice log-likelihoods. */
export function multipleChoiceScores(
  lls: readonly number[],
  choices: readonly string[],
  gold: number,
): { acc: number; acc_norm: number } {
  const argmax = (xs: readonly number[]) => {
    let best = 0;
    for (let i = 1; i < xs.length; i++) if (xs[i] > xs[best]) best = i; // first max, like np.argmax
    return best;
  };
  // acc_norm divides by the length of the choice in characters (Python len of the str).
  const normed = lls.map((ll, i) => ll / pyLen(choices[i]));
  return { acc: argmax(lls) === gold ? 1 : 0, acc_norm: argmax(normed) === gold ? 1 : 0 };
}

/** Python len() of a str: code points, not UTF-16 units. */
export function pyLen(s: string): number {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

/** Group stderr: the harness's pooled_sample_stderr over subtasks. */
export function pooledSampleStderr(stderrs: readonly number[], sizes: readonly number[]): number {
  let num = 0, total = 0;
  for (let i = 0; i < sizes.length; i++) {
    num += (sizes[i] - 1) * stderrs[i] ** 2 * sizes[i];
    total += sizes[i];
  }
  const pooledVar = num / (total - sizes.length);
  return Math.sqrt(pooledVar / total);
}

/** Size-weighted mean of subtask metrics (aggregate_subtask_metrics, weight_by_size). */
export function weightedMean(values: readonly number[], sizes: readonly number[]): number {
  let s = 0, n = 0;
  for (let i = 0; i < values.length; i++) (s += values[i] * sizes[i]), (n += sizes[i]);
  return s / n;
}

/** Perplexity metrics from (loglikelihood, weight) pairs: weighted_perplexity and bits_per_byte. */
export function perplexityMetrics(
  lls: readonly number[],
  words: readonly number[],
  bytes: readonly number[],
) {
  const sum = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0);
  const ll = sum(lls), w = sum(words), b = sum(bytes);
  return {
    word_perplexity: Math.exp(-ll / w),
    byte_perplexity: Math.exp(-ll / b),
    bits_per_byte: -ll / b / Math.LN2,
  };
}

/** Words as the harness's wikitext task counts them: len(re.split(r"\s+", text)). */
export function countWords(text: string): number {
  return text.split(/\s+/).length;
}

export function countBytes(text: string): number {
  return new TextEncoder().encode(text).length;
}
