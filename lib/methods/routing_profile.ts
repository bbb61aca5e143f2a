// Routing statistics of the original model on calibration text (CD-MoE section 1a):
// per MoE layer and routed expert, how often it is in a token's top-k and the sum and
// mean of its routing weight w_e (the weight the model uses: raw softmax probability,
// renormalised over the top-k only when the config says so). avg_w is the fixed weight
// wbar of a condensed expert.

import type { Routing } from "../backend/backend.ts";
import { readResults, ResultsError } from "../io/results.ts";
import type { ExpertSaliency } from "./expert_saliency.ts";

/** Results file kind and schema of scripts/profile_routing.ts. */
export const PROFILE_KIND = "routing-profile";
export const PROFILE_SCHEMA = 1;

export interface LayerProfile {
  layer: number;
  tokens: number;
  experts: number;
  topK: number;
  freq: number[];
  sum_w: number[];
  avg_w: number[];
  /** Normalised entropy H/Hmax of the expert load distribution (1 = uniform). */
  load_entropy: number;
  /** Mean over tokens of the entropy (nats) of the full router softmax. */
  mean_token_entropy: number;
  /** Load max/mean, min/mean and coefficient of variation of freq. */
  max_over_mean: number;
  min_over_mean: number;
  cv: number;
  /** Most frequent pairs of experts chosen together by one token. */
  top_pairs: { experts: [number, number]; count: number; share: number }[];
}

export interface RoutingProfile {
  layers: Record<string, LayerProfile>;
}

class LayerCounts {
  tokens = 0;
  tokenEntropy = 0;
  freq: Float64Array;
  sumW: Float64Array;
  pairs: Float64Array;
  constructor(readonly experts: number, readonly topK: number) {
    this.freq = new Float64Array(experts);
    this.sumW = new Float64Array(experts);
    this.pairs = new Float64Array(experts * experts);
  }
}

export class RoutingProfiler {
  private layers = new Map<number, LayerCounts>();

  /** One batch of routing decisions; `logits` [tokens, experts] for the token entropy. */
  observe(layer: number, experts: number, topK: number, routing: Routing, logits: Float32Array) {
    let c = this.layers.get(layer);
    if (!c) this.layers.set(layer, c = new LayerCounts(experts, topK));
    const tokens = routing.indices.length / topK;
    c.tokens += tokens;
    for (let t = 0; t < tokens; t++) {
      for (let j = 0; j < topK; j++) {
        const e = routing.indices[t * topK + j];
        c.freq[e]++;
        c.sumW[e] += routing.weights[t * topK + j];
        for (let j2 = j + 1; j2 < topK; j2++) {
          const e2 = routing.indices[t * topK + j2];
          c.pairs[Math.min(e, e2) * experts + Math.max(e, e2)]++;
        }
      }
      let max = -Infinity;
      for (let e = 0; e < experts; e++) max = Math.max(max, logits[t * experts + e]);
      let sum = 0;
      for (let e = 0; e < experts; e++) sum += Math.exp(logits[t * experts + e] - max);
      let h = 0;
      for (let e = 0; e < experts; e++) {
        const p = Math.exp(logits[t * experts + e] - max) / sum;
        if (p > 0) h -= p * Math.log(p);
      }
      c.tokenEntropy += h;
    }
  }

  result(topPairs = 10): RoutingProfile {
    const layers: Record<string, LayerProfile> = {};
    for (const [layer, c] of [...this.layers].sort((a, b) => a[0] - b[0])) {
      const E = c.experts, freq = [...c.freq], sumW = [...c.sumW];
      const total = freq.reduce((a, b) => a + b, 0), mean = total / E;
      let h = 0;
      for (const f of freq) if (f > 0) h -= (f / total) * Math.log(f / total);
      const variance = freq.reduce((a, f) => a + (f - mean) ** 2, 0) / E;
      const pairs: LayerProfile["top_pairs"] = [];
      for (let a = 0; a < E; a++) {
        for (let b = a + 1; b < E; b++) {
          const n = c.pairs[a * E + b];
          if (n > 0) pairs.push({ experts: [a, b], count: n, share: n / c.tokens });
        }
      }
      pairs.sort((x, y) => y.count - x.count || x.experts[0] - y.experts[0]);
      layers[layer] = {
        layer,
        tokens: c.tokens,
        experts: E,
        topK: c.topK,
        freq,
        sum_w: sumW,
        avg_w: freq.map((f, e) => (f > 0 ? sumW[e] / f : 0)),
        load_entropy: E > 1 ? h / Math.log(E) : 1,
        mean_token_entropy: c.tokenEntropy / c.tokens,
        max_over_mean: Math.max(...freq) / mean,
        min_over_mean: Math.min(...freq) / mean,
        cv: Math.sqrt(variance) / mean,
        top_pairs: pairs.slice(0, topPairs),
      };
    }
    return { layers };
  }
}

/** Text table of the per-layer summary. */
export function formatProfile(p: RoutingProfile): string {
  const lines = ["layer  tokens  H/Hmax  tokenH  max/mean  min/mean     CV  top pair"];
  for (const lp of Object.values(p.layers)) {
    const pair = lp.top_pairs[0];
    lines.push(
      `${String(lp.layer).padStart(5)} ${String(lp.tokens).padStart(7)} ` +
        `${lp.load_entropy.toFixed(4).padStart(7)} ${
          lp.mean_token_entropy.toFixed(3).padStart(7)
        } ` +
        `${lp.max_over_mean.toFixed(3).padStart(9)} ${lp.min_over_mean.toFixed(3).padStart(9)} ` +
        `${lp.cv.toFixed(3).padStart(6)}  ` +
        (pair ? `${pair.experts[0]}+${pair.experts[1]} (${(100 * pair.share).toFixed(1)}%)` : "-"),
    );
  }
  return lines.join("\n");
}

/** What a profile was computed on, as the search results record it. */
export interface ProfileData {
  /** The profile_routing.ts results file it came from, or null (computed by the search). */
  file: string | null;
  docs: number;
  tokens: number;
  /** Tokens per document, BOS included (the full length was capped at this). */
  max_len: number;
  full_length: boolean;
}

/**
 * A profile written by scripts/profile_routing.ts, for a search: refused unless it was
 * computed on the same model folder (hash) and calibration file (sha256), and covers every
 * MoE layer (layer index -> number of routed experts) of the model.
 */
export async function readProfileFile(
  path: string,
  want: { modelHash: string; dataSha256: string; moeLayers: Map<number, number> },
): Promise<{ profile: RoutingProfile; data: ProfileData; saliency?: ExpertSaliency }> {
  const r = await readResults(path, PROFILE_KIND, PROFILE_SCHEMA);
  const model = r.model as { path?: string; hash?: string } | undefined;
  const data = r.data as { path?: string; sha256?: string; docs?: number; tokens?: number };
  const settings = r.settings as { max_len?: number; full_length?: boolean } | undefined;
  if (model?.hash !== want.modelHash) {
    throw new ResultsError(
      path,
      `profile of another model (${model?.path}: model hash differs from the searched model's)`,
    );
  }
  if (data?.sha256 !== want.dataSha256) {
    throw new ResultsError(
      path,
      `profile of other calibration text (${data?.path}: sha256 differs from --data's)`,
    );
  }
  const profile = r.profile as RoutingProfile | undefined;
  for (const [l, experts] of want.moeLayers) {
    const lp = profile?.layers?.[l];
    if (!Array.isArray(lp?.avg_w) || lp.avg_w.length !== experts) {
      throw new ResultsError(path, `no profile of MoE layer ${l} with ${experts} experts`);
    }
  }
  return {
    profile: profile!,
    saliency: r.saliency as ExpertSaliency | undefined,
    data: {
      file: path,
      docs: data.docs!,
      tokens: data.tokens!,
      max_len: settings?.max_len!,
      full_length: !!settings?.full_length,
    },
  };
}
