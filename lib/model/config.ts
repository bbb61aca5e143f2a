// One model description for every supported MoE decoder. Architectures differ only in
// data: config keys and their class defaults, tensor names, and a few semantic switches
// (see ../shared fixtures README and docs/architectures.md).

export class ConfigError extends Error {
  constructor(path: string, problem: string) {
    super(`${path}: ${problem}`);
    this.name = "ConfigError";
  }
}

export type ModelType = "deepseek" | "qwen2_moe" | "qwen3_moe" | "olmoe" | "mixtral";

/** Compressed experts' main weights: divided by the top-k sum (the release) or the main sum. */
export type RenormOver = "top_k" | "main";

/** How top-k routing weights are renormalised. */
export interface Renorm {
  normalize: boolean;
  /** Added to the sum before dividing (DeepSeek v1 uses 1e-20). */
  eps: number;
}

export type MlpSpec =
  /** Plain SwiGLU with `width` (dense layers, and condensed MoE layers). */
  | { kind: "dense"; width: number; gatedShared?: { width: number } }
  | {
    kind: "moe";
    experts: number;
    topK: number;
    expertWidth: number;
    renorm: Renorm;
    /** Always-on shared expert MLP width (0: none). */
    sharedWidth: number;
    /** Qwen2-MoE: shared expert output scaled by sigmoid(x . shared_expert_gate). */
    sharedGate: boolean;
    /**
     * Compressed experts (He et al. 2025): the first `mainExperts` of the sorted top-k run
     * in full, the other topK - mainExperts are replaced by the layer's `ces` scaling
     * vectors (see lib/model/compressed_experts.ts). Absent: plain top-k.
     */
    mainExperts?: number;
    /**
     * Where the architecture renormalises, what the main experts' weights are divided by:
     * "top_k", the sum over all top-k probabilities (the compressed-experts release,
     * default), or "main", the main experts' sum (ces = ones is then plain top-k_m).
     */
    renormOver?: RenormOver;
  }
  /** LayerDrop: the MLP block is removed, the residual passes through. */
  | { kind: "none" };

export type MoeSpec = Extract<MlpSpec, { kind: "moe" }>;

export interface LayerSpec {
  index: number;
  /** BlockDrop removes attention too. */
  attention: boolean;
  mlp: MlpSpec;
  /** Sliding attention window for this layer, or null for full causal attention. */
  window: number | null;
}

/** Tensor naming per architecture, relative to `model.layers.{l}.`. */
export interface TensorNames {
  moeBlock: string; // "mlp" | "block_sparse_moe"
  proj: { gate: string; up: string; down: string };
  shared: string | null; // "shared_experts" | "shared_expert"
}

export interface ModelSpec {
  modelType: ModelType;
  vocab: number;
  hidden: number;
  numLayers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  ropeTheta: number;
  /** Linear RoPE scaling divides positions by this factor (1 = none). */
  ropeLinearFactor: number;
  eps: number;
  maxPositions: number;
  tieEmbeddings: boolean;
  qkvBias: boolean;
  oBias: boolean;
  /** RMSNorms q_norm / k_norm on q and k after the projections, before RoPE. */
  qkNorm: boolean;
  /**
   * Rows those norms run over: false (OLMoE) the whole projection, one weight of heads *
   * headDim; true (Qwen3-MoE) each head, one weight of headDim shared by the heads.
   */
  qkNormPerHead: boolean;
  clipQkv: number | null;
  names: TensorNames;
  layers: LayerSpec[];
  bosTokenId: number | null;
  eosTokenId: number | null;
  padTokenId: number | null;
}

// Class defaults of each reference config class (transformers v4.45.1 / DeepSeek remote
// code). config.json written with use_diff omits keys equal to these, so they matter.
const DEFAULTS: Record<ModelType, Record<string, unknown>> = {
  deepseek: {
    vocab_size: 102400,
    hidden_size: 4096,
    intermediate_size: 11008,
    moe_intermediate_size: 1407,
    num_hidden_layers: 30,
    num_attention_heads: 32,
    num_key_value_heads: null,
    n_shared_experts: null,
    n_routed_experts: null,
    num_experts_per_tok: null,
    moe_layer_freq: 1,
    first_k_dense_replace: 0,
    norm_topk_prob: false,
    scoring_func: "softmax",
    hidden_act: "silu",
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    pad_token_id: null,
    bos_token_id: 100000,
    eos_token_id: 100001,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    rope_scaling: null,
    attention_bias: false,
  },
  qwen2_moe: {
    vocab_size: 151936,
    hidden_size: 2048,
    intermediate_size: 5632,
    num_hidden_layers: 24,
    num_attention_heads: 16,
    num_key_value_heads: 16,
    hidden_act: "silu",
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    rope_scaling: null,
    use_sliding_window: false,
    sliding_window: 4096,
    max_window_layers: 28,
    decoder_sparse_step: 1,
    moe_intermediate_size: 1408,
    shared_expert_intermediate_size: 5632,
    num_experts_per_tok: 4,
    num_experts: 60,
    norm_topk_prob: false,
    mlp_only_layers: [],
    bos_token_id: null,
    eos_token_id: null,
    pad_token_id: null,
  },
  // Qwen3MoeConfig of transformers v4.51-v4.57. It has no head_dim key: the attention
  // reads config.head_dim when present, hidden_size / num_attention_heads otherwise.
  qwen3_moe: {
    vocab_size: 151936,
    hidden_size: 2048,
    intermediate_size: 6144,
    num_hidden_layers: 24,
    num_attention_heads: 32,
    num_key_value_heads: 4,
    hidden_act: "silu",
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    rope_scaling: null,
    attention_bias: false,
    use_sliding_window: false,
    sliding_window: 4096,
    max_window_layers: 28,
    decoder_sparse_step: 1,
    moe_intermediate_size: 768,
    num_experts_per_tok: 8,
    num_experts: 128,
    norm_topk_prob: false,
    mlp_only_layers: null,
    bos_token_id: null,
    eos_token_id: null,
    pad_token_id: null,
  },
  olmoe: {
    vocab_size: 50304,
    hidden_size: 2048,
    intermediate_size: 2048,
    num_hidden_layers: 16,
    num_attention_heads: 16,
    num_key_value_heads: null,
    hidden_act: "silu",
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-5,
    pad_token_id: 1,
    bos_token_id: null,
    eos_token_id: 50279,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    rope_scaling: null,
    attention_bias: false,
    clip_qkv: null,
    num_experts_per_tok: 8,
    num_experts: 64,
    norm_topk_prob: false,
  },
  mixtral: {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    hidden_act: "silu",
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-5,
    pad_token_id: null,
    bos_token_id: 1,
    eos_token_id: 2,
    tie_word_embeddings: false,
    rope_theta: 1e6,
    rope_scaling: null,
    sliding_window: null,
    num_experts_per_tok: 2,
    num_local_experts: 8,
  },
};

const NAMES: Record<ModelType, TensorNames> = {
  deepseek: {
    moeBlock: "mlp",
    proj: { gate: "gate_proj", up: "up_proj", down: "down_proj" },
    shared: "shared_experts",
  },
  qwen2_moe: {
    moeBlock: "mlp",
    proj: { gate: "gate_proj", up: "up_proj", down: "down_proj" },
    shared: "shared_expert",
  },
  qwen3_moe: {
    moeBlock: "mlp",
    proj: { gate: "gate_proj", up: "up_proj", down: "down_proj" },
    shared: null,
  },
  olmoe: {
    moeBlock: "mlp",
    proj: { gate: "gate_proj", up: "up_proj", down: "down_proj" },
    shared: null,
  },
  mixtral: {
    moeBlock: "block_sparse_moe",
    proj: { gate: "w1", up: "w3", down: "w2" },
    shared: null,
  },
};

export const SUPPORTED_MODEL_TYPES = Object.keys(DEFAULTS) as ModelType[];

/** Build the model description from a parsed config.json. `path` names it in errors. */
export function parseModelConfig(raw: Record<string, unknown>, path = "config.json"): ModelSpec {
  const modelType = sourceModelType(raw, path) as ModelType;
  if (typeof modelType !== "string") throw new ConfigError(path, `missing "model_type"`);
  if (!(modelType in DEFAULTS)) {
    throw new ConfigError(
      path,
      `unsupported model_type "${modelType}" (supported: ${SUPPORTED_MODEL_TYPES.join(", ")})`,
    );
  }
  const cfg = { ...DEFAULTS[modelType], ...raw };
  const int = (key: string, min = 1): number => {
    const v = cfg[key];
    if (!Number.isSafeInteger(v) || (v as number) < min) {
      throw new ConfigError(
        path,
        `"${key}" must be an integer >= ${min}, got ${JSON.stringify(v)}`,
      );
    }
    return v as number;
  };
  const num = (key: string): number => {
    const v = cfg[key];
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      throw new ConfigError(path, `"${key}" must be a positive number, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const bool = (key: string): boolean => {
    const v = cfg[key];
    if (typeof v !== "boolean") {
      throw new ConfigError(path, `"${key}" must be true or false, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const optInt = (
    key: string,
  ): number | null => (cfg[key] === null || cfg[key] === undefined ? null : int(key, 0));

  if (cfg.hidden_act !== "silu") {
    throw new ConfigError(path, `hidden_act "${cfg.hidden_act}" is not supported (only "silu")`);
  }
  const hidden = int("hidden_size");
  const heads = int("num_attention_heads");
  if (cfg.num_key_value_heads === null || cfg.num_key_value_heads === undefined) {
    cfg.num_key_value_heads = heads;
  }
  const kvHeads = int("num_key_value_heads");
  if (heads % kvHeads !== 0) {
    throw new ConfigError(
      path,
      `num_attention_heads ${heads} is not a multiple of num_key_value_heads ${kvHeads}`,
    );
  }
  const headDim = cfg.head_dim != null ? int("head_dim") : hidden / heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) {
    throw new ConfigError(
      path,
      `head dimension ${headDim} (${
        cfg.head_dim != null ? "head_dim" : "hidden_size / num_attention_heads"
      }) must be an even integer`,
    );
  }
  // transformers v5 writes rope_theta and the scaling as one "rope_parameters" object.
  const rp = cfg.rope_parameters;
  if (rp !== null && rp !== undefined) {
    if (typeof rp !== "object" || Array.isArray(rp)) {
      throw new ConfigError(path, `"rope_parameters" must be an object`);
    }
    const { rope_theta, ...scaling } = rp as Record<string, unknown>;
    if (rope_theta !== undefined) cfg.rope_theta = rope_theta;
    cfg.rope_scaling = scaling.rope_type === undefined ? null : scaling; // no type: default
  }
  let ropeLinearFactor = 1;
  const rs = cfg.rope_scaling as Record<string, unknown> | null;
  // rope_type "default" is plain RoPE (transformers' name for no scaling).
  if (rs !== null && rs !== undefined && (rs.rope_type ?? rs.type) !== "default") {
    const type = rs.rope_type ?? rs.type;
    if (type !== "linear" || typeof rs.factor !== "number" || rs.factor <= 0) {
      throw new ConfigError(
        path,
        `rope_scaling ${JSON.stringify(rs)} is not supported (only {"type":"linear","factor":f})`,
      );
    }
    ropeLinearFactor = rs.factor;
  }
  const numLayers = int("num_hidden_layers");

  let qkvBias = false, oBias = false, qkNorm = false, qkNormPerHead = false;
  let clipQkv: number | null = null;
  const layers: LayerSpec[] = [];
  const dense = (): MlpSpec => ({ kind: "dense", width: int("intermediate_size") });

  // Qwen2-MoE and Qwen3-MoE: which layers are sparse.
  const qwenSparse = (l: number): boolean => {
    const mlpOnly = cfg.mlp_only_layers ?? [];
    if (!Array.isArray(mlpOnly)) throw new ConfigError(path, `"mlp_only_layers" must be a list`);
    return !mlpOnly.includes(l) && int("num_experts", 0) > 0 &&
      (l + 1) % int("decoder_sparse_step") === 0;
  };
  for (let l = 0; l < numLayers; l++) {
    let mlp: MlpSpec;
    let window: number | null = null;
    switch (modelType) {
      case "deepseek": {
        if (cfg.scoring_func !== "softmax") {
          throw new ConfigError(
            path,
            `scoring_func "${cfg.scoring_func}" is not supported (only "softmax")`,
          );
        }
        qkvBias = oBias = bool("attention_bias");
        const isMoe = cfg.n_routed_experts !== null && l >= int("first_k_dense_replace", 0) &&
          l % int("moe_layer_freq") === 0;
        if (isMoe) {
          const topK = int("num_experts_per_tok");
          mlp = {
            kind: "moe",
            experts: int("n_routed_experts"),
            topK,
            expertWidth: int("moe_intermediate_size"),
            renorm: { normalize: bool("norm_topk_prob") && topK > 1, eps: 1e-20 },
            sharedWidth: cfg.n_shared_experts === null
              ? 0
              : int("n_shared_experts", 0) * int("moe_intermediate_size"),
            sharedGate: false,
          };
        } else mlp = dense();
        break;
      }
      case "qwen2_moe": {
        qkvBias = true;
        mlp = qwenSparse(l)
          ? {
            kind: "moe",
            experts: int("num_experts"),
            topK: int("num_experts_per_tok"),
            expertWidth: int("moe_intermediate_size"),
            renorm: { normalize: bool("norm_topk_prob"), eps: 0 },
            sharedWidth: int("shared_expert_intermediate_size", 0),
            sharedGate: int("shared_expert_intermediate_size", 0) > 0,
          }
          : dense();
        if (bool("use_sliding_window") && l >= int("max_window_layers", 0)) {
          window = optInt("sliding_window");
        }
        break;
      }
      case "qwen3_moe": {
        qkvBias = oBias = bool("attention_bias");
        qkNorm = qkNormPerHead = true;
        mlp = qwenSparse(l)
          ? {
            kind: "moe",
            experts: int("num_experts"),
            topK: int("num_experts_per_tok"),
            expertWidth: int("moe_intermediate_size"),
            renorm: { normalize: bool("norm_topk_prob"), eps: 0 },
            sharedWidth: 0,
            sharedGate: false,
          }
          : dense();
        // The config sets sliding_window to None unless use_sliding_window; when set,
        // transformers' eager attention masks every layer with it (max_window_layers
        // does not enter that mask).
        if (bool("use_sliding_window")) window = optInt("sliding_window");
        break;
      }
      case "olmoe": {
        qkvBias = oBias = bool("attention_bias");
        qkNorm = true;
        if (cfg.clip_qkv !== null && cfg.clip_qkv !== undefined) clipQkv = num("clip_qkv");
        mlp = {
          kind: "moe",
          experts: int("num_experts"),
          topK: int("num_experts_per_tok"),
          expertWidth: int("intermediate_size"),
          renorm: { normalize: bool("norm_topk_prob"), eps: 0 },
          sharedWidth: 0,
          sharedGate: false,
        };
        break;
      }
      case "mixtral": {
        mlp = {
          kind: "moe",
          experts: int("num_local_experts"),
          topK: int("num_experts_per_tok"),
          expertWidth: int("intermediate_size"),
          renorm: { normalize: true, eps: 0 },
          sharedWidth: 0,
          sharedGate: false,
        };
        window = optInt("sliding_window");
        break;
      }
    }
    if (mlp.kind === "moe" && mlp.topK > mlp.experts) {
      throw new ConfigError(
        path,
        `num_experts_per_tok ${mlp.topK} exceeds the number of experts ${mlp.experts}`,
      );
    }
    layers.push({ index: l, attention: true, mlp, window });
  }
  applyCompressedLayers(raw.cdmoe, layers, path);
  if (raw.compressed_experts !== undefined && raw.compressed_experts !== null) {
    const ce = raw.compressed_experts as { main_experts?: unknown; renorm_over?: unknown };
    if (typeof ce !== "object" || Array.isArray(ce)) {
      throw new ConfigError(path, `"compressed_experts" must be {"main_experts": k_m}`);
    }
    enableCompressedExperts(
      layers,
      ce.main_experts,
      `${path}: "compressed_experts.main_experts"`,
      modelType,
      ce.renorm_over ?? "top_k",
      `${path}: "compressed_experts.renorm_over"`,
    );
  }

  return {
    modelType,
    vocab: int("vocab_size"),
    hidden,
    numLayers,
    heads,
    kvHeads,
    headDim,
    ropeTheta: num("rope_theta"),
    ropeLinearFactor,
    eps: num("rms_norm_eps"),
    maxPositions: int("max_position_embeddings"),
    tieEmbeddings: bool("tie_word_embeddings"),
    qkvBias,
    oBias,
    qkNorm,
    qkNormPerHead,
    clipQkv,
    names: NAMES[modelType],
    layers,
    bosTokenId: optInt("bos_token_id"),
    eosTokenId: firstId(cfg.eos_token_id),
    padTokenId: optInt("pad_token_id"),
  };
}

/**
 * model_type a condensed checkpoint's config.json carries: "<original>_cdmoe", so that
 * loaders that do not know the layout (transformers, vLLM) refuse the folder instead of
 * building the full MoE around missing weights. The original is under "cdmoe.original".
 */
export const CDMOE_SUFFIX = "_cdmoe";

/** The architecture behind model_type: "<t>_cdmoe" -> t (folders written before keep t). */
function sourceModelType(raw: Record<string, unknown>, path: string): unknown {
  const t = raw.model_type;
  if (typeof t !== "string" || !t.endsWith(CDMOE_SUFFIX)) return t;
  const original = (raw.cdmoe as { original?: { model_type?: unknown } } | null | undefined)
    ?.original?.model_type;
  if (`${original}${CDMOE_SUFFIX}` !== t) {
    throw new ConfigError(
      path,
      `model_type "${t}" marks a condensed checkpoint, but "cdmoe.original.model_type" is ` +
        `${JSON.stringify(original)}`,
    );
  }
  return original;
}

/**
 * A checkpoint written by scripts/condense.ts records its changed layers under "cdmoe":
 * {"layers": {"<l>": {"change": "condense", "intermediate_size": W, "gated_shared_size"?: S}
 * | {"change": "layerdrop"} | {"change": "blockdrop"}}, ...provenance}. A condensed layer
 * is a plain dense SwiGLU MLP (Qwen: plus its sigmoid-gated shared expert).
 */
function applyCompressedLayers(cdmoe: unknown, layers: LayerSpec[], path: string): void {
  if (cdmoe === undefined || cdmoe === null) return;
  const changes = (cdmoe as { layers?: unknown }).layers;
  if (typeof changes !== "object" || changes === null || Array.isArray(changes)) {
    throw new ConfigError(path, `"cdmoe.layers" must be an object of layer index -> change`);
  }
  for (const [key, value] of Object.entries(changes as Record<string, unknown>)) {
    const l = Number(key);
    const where = `"cdmoe.layers.${key}"`;
    if (!Number.isSafeInteger(l) || l < 0 || l >= layers.length) {
      throw new ConfigError(path, `${where}: no decoder layer ${key} (model has ${layers.length})`);
    }
    const c = value as Record<string, unknown>;
    const width = (k: string): number => {
      const v = c[k];
      if (!Number.isSafeInteger(v) || (v as number) < 0) {
        throw new ConfigError(path, `${where}: "${k}" must be an integer >= 0`);
      }
      return v as number;
    };
    switch (c?.change) {
      case "condense":
        // Width 0 without a gated shared expert (OLMoE/Mixtral keeping nothing): no MLP.
        layers[l].mlp = c.gated_shared_size === undefined && width("intermediate_size") === 0
          ? { kind: "none" }
          : c.gated_shared_size === undefined
          ? { kind: "dense", width: width("intermediate_size") }
          : {
            kind: "dense",
            width: width("intermediate_size"),
            gatedShared: { width: width("gated_shared_size") },
          };
        break;
      case "layerdrop":
        layers[l].mlp = { kind: "none" };
        break;
      case "blockdrop":
        layers[l].mlp = { kind: "none" };
        layers[l].attention = false;
        break;
      default:
        throw new ConfigError(
          path,
          `${where}: "change" must be "condense", "layerdrop" or "blockdrop", got ${
            JSON.stringify(c?.change)
          }`,
        );
    }
  }
}

/**
 * Turn every MoE layer into a compressed-experts layer with `mainExperts` full experts
 * (from config.json's "compressed_experts" section or a CLI flag; `where` names it in
 * errors). k_m must leave at least one auxiliary expert: 1 <= k_m <= topK - 1.
 * `renormOver` ("top_k" or "main", `renormWhere` in errors): see MlpSpec.renormOver.
 */
export function enableCompressedExperts(
  layers: LayerSpec[],
  mainExperts: unknown,
  where: string,
  modelType?: ModelType,
  renormOver: unknown = "top_k",
  renormWhere = where,
): void {
  const moe = layers.filter((l) => l.mlp.kind === "moe");
  if (moe.length === 0) {
    throw new ConfigError(where, "compressed experts need MoE layers, but the model has none");
  }
  if (renormOver !== "top_k" && renormOver !== "main") {
    throw new ConfigError(
      renormWhere,
      `must be "top_k" or "main", got ${JSON.stringify(renormOver)}`,
    );
  }
  for (const layer of moe) {
    const mlp = layer.mlp as Extract<MlpSpec, { kind: "moe" }>;
    if (
      !Number.isSafeInteger(mainExperts) || (mainExperts as number) < 1 ||
      (mainExperts as number) > mlp.topK - 1
    ) {
      throw new ConfigError(
        where,
        `main experts must be an integer in [1, ${mlp.topK - 1}] ` +
          `(layer ${layer.index} routes top-${mlp.topK}), got ${JSON.stringify(mainExperts)}`,
      );
    }
    mlp.mainExperts = mainExperts as number;
    mlp.renormOver = renormOver;
    // "main": the main weights follow plain top-k_m routing, and DeepSeek never
    // renormalises top-1. ("top_k" renormalises as top-k routing does, and k > 1.)
    if (renormOver === "main" && modelType === "deepseek" && mainExperts === 1) {
      mlp.renorm = { ...mlp.renorm, normalize: false };
    }
  }
}

/** Width d of the `ces` vectors [E, 3, d]: max(hidden, expert width) so every slot fits. */
export function cesWidth(spec: ModelSpec, mlp: { expertWidth: number }): number {
  return Math.max(spec.hidden, mlp.expertWidth);
}

/** `model.layers.{l}.mlp.ces` (Mixtral: `block_sparse_moe.ces`), shape [E, 3, d]. */
export function cesName(spec: ModelSpec, l: number): string {
  return `${layerPrefix(l)}${spec.names.moeBlock}.ces`;
}

// eos_token_id may be a list in newer configs; the first is the primary one.
function firstId(v: unknown): number | null {
  if (Array.isArray(v)) return v.length ? (v[0] as number) : null;
  return typeof v === "number" ? v : null;
}

/** Indices of the layers whose MLP is a routed MoE block. */
export function moeLayers(spec: ModelSpec): number[] {
  return spec.layers.filter((l) => l.mlp.kind === "moe").map((l) => l.index);
}

/** Tensor name helpers: every weight name the decoder reads is built here. */
export function layerPrefix(l: number): string {
  return `model.layers.${l}.`;
}
export function routerName(spec: ModelSpec, l: number): string {
  return `${layerPrefix(l)}${spec.names.moeBlock}.gate.weight`;
}
export function expertName(
  spec: ModelSpec,
  l: number,
  e: number,
  proj: "gate" | "up" | "down",
): string {
  return `${layerPrefix(l)}${spec.names.moeBlock}.experts.${e}.${spec.names.proj[proj]}.weight`;
}
export function sharedName(spec: ModelSpec, l: number, proj: "gate" | "up" | "down"): string {
  return `${layerPrefix(l)}mlp.${spec.names.shared}.${proj}_proj.weight`;
}
export function sharedGateName(l: number): string {
  return `${layerPrefix(l)}mlp.shared_expert_gate.weight`;
}
export function denseName(l: number, proj: "gate" | "up" | "down"): string {
  return `${layerPrefix(l)}mlp.${proj}_proj.weight`;
}

/** The three weights of one SwiGLU MLP: down(silu(gate x) * up x). */
export interface MlpNames {
  gate: string;
  up: string;
  down: string;
}

/** The MlpNames whose projection names come from `name(proj)`. */
export function mlpNames(name: (proj: "gate" | "up" | "down") => string): MlpNames {
  return { gate: name("gate"), up: name("up"), down: name("down") };
}
