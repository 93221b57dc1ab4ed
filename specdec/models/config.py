"""One normalised view of a Hugging Face config.json for every architecture we run.

HF configs differ per family (Qwen3.5 nests text settings under `text_config`, RoPE settings live in
`rope_parameters` or at the top level, the hybrid layout is `layer_types` or `full_attention_interval`).
`ModelConfig.from_hf` reads them all into one flat record, so the models never look at raw dicts.
"""

from dataclasses import dataclass, field

from ..errors import ConfigError

HYBRID_TYPES = {
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_next": "qwen3_next",
}
DENSE_TYPES = {"qwen3": "qwen3", "llama": "llama"}
SUPPORTED = sorted(HYBRID_TYPES) + sorted(DENSE_TYPES)


@dataclass
class ModelConfig:
    model_type: str  # family: qwen3_5_moe | qwen3_5 | qwen3_next | qwen3 | llama
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    layer_types: list = field(default_factory=list)  # "linear_attention" | "full_attention" per layer
    # Gated DeltaNet
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    mtp_num_hidden_layers: int = 0
    eos_token_id: list = field(default_factory=list)
    # Not an HF key: how the GDN input projection is split into Linears (set by the loader when a
    # checkpoint quantizes its parts differently). Parts, in canonical order: qkv, z, b, a.
    in_proj_groups: list = field(default_factory=lambda: [["qkv", "z", "b", "a"]])

    @property
    def hybrid(self) -> bool:
        return self.model_type in ("qwen3_5_moe", "qwen3_5", "qwen3_next")

    @property
    def qk_norm(self) -> bool:  # per-head RMSNorm on q and k
        return self.model_type != "llama"

    @property
    def gated_attention(self) -> bool:  # q_proj also emits a sigmoid output gate
        return self.hybrid

    def is_moe_layer(self, i: int) -> bool:
        if self.num_experts <= 0 or i in self.mlp_only_layers:
            return False
        return (i + 1) % max(self.decoder_sparse_step, 1) == 0

    @classmethod
    def from_hf(cls, raw: dict) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        top_type = raw.get("model_type")
        if top_type is None:
            raise ConfigError("config.json has no 'model_type'")
        if top_type not in HYBRID_TYPES and top_type not in DENSE_TYPES:
            raise ConfigError(
                f"unsupported model_type {top_type!r}; supported: {', '.join(SUPPORTED)}"
            )
        text = raw.get("text_config", raw) if top_type in ("qwen3_5_moe", "qwen3_5") else raw
        if not isinstance(text, dict):
            raise ConfigError("config.json 'text_config' must be a JSON object")
        family = HYBRID_TYPES.get(top_type) or DENSE_TYPES[top_type]

        def get(key, default=None, required=False):
            value = text.get(key, raw.get(key, default))
            if required and value is None:
                raise ConfigError(f"config.json is missing required key {key!r} for {top_type}")
            return value

        def positive_int(key, default=None, required=True):
            value = get(key, default, required)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json key {key!r} must be a positive integer, found {value!r}")
            return value

        hidden = positive_int("hidden_size")
        heads = positive_int("num_attention_heads")
        kv_heads = positive_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ConfigError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = get("head_dim") or hidden // heads
        layers = positive_int("num_hidden_layers")

        rope = get("rope_parameters") or {}
        rope_scaling = get("rope_scaling")
        if not isinstance(rope, dict):
            raise ConfigError("config.json 'rope_parameters' must be a JSON object")
        rope_type = rope.get("rope_type") or (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type")
        if rope_type not in (None, "default", "llama3"):
            raise ConfigError(f"unsupported RoPE type {rope_type!r} (supported: default, llama3)")
        if rope_type == "llama3":
            rope_scaling = {**(rope_scaling or {}), **rope}

        eos = get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

        cfg = cls(
            model_type=family,
            vocab_size=positive_int("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=get("intermediate_size", 0) or 0,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))),
            rope_scaling=rope_scaling if rope_type == "llama3" else None,
            max_position_embeddings=get("max_position_embeddings", 32768),
            # A multimodal wrapper's own key decides (transformers ties by the top-level config).
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", get("tie_word_embeddings", False))),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            eos_token_id=eos,
        )
        if cfg.hybrid:
            cfg._read_hybrid(get, positive_int, family)
        else:
            cfg.layer_types = ["full_attention"] * layers
            positive_int("intermediate_size")
        return cfg

    def _read_hybrid(self, get, positive_int, family):
        layers = self.num_hidden_layers
        types = get("layer_types")
        if types is None:
            interval = positive_int("full_attention_interval", 4)
            types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
            ]
        if len(types) != layers or any(t not in ("linear_attention", "full_attention") for t in types):
            raise ConfigError(
                f"layer_types must list {layers} entries of 'linear_attention' or 'full_attention', found {types!r}"
            )
        self.layer_types = list(types)
        self.linear_num_key_heads = positive_int("linear_num_key_heads")
        self.linear_num_value_heads = positive_int("linear_num_value_heads")
        self.linear_key_head_dim = positive_int("linear_key_head_dim")
        self.linear_value_head_dim = positive_int("linear_value_head_dim")
        self.linear_conv_kernel_dim = positive_int("linear_conv_kernel_dim", 4)
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        self.mtp_num_hidden_layers = get("mtp_num_hidden_layers", get("num_nextn_predict_layers", 0)) or 0
        if family == "qwen3_5":  # dense hybrid: no experts
            positive_int("intermediate_size")
            return
        self.num_experts = positive_int("num_experts")
        self.num_experts_per_tok = positive_int("num_experts_per_tok")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )
        self.moe_intermediate_size = positive_int("moe_intermediate_size")
        self.shared_expert_intermediate_size = get("shared_expert_intermediate_size", 0) or 0
        # Qwen3.5-MoE's router always renormalises its top-k; Qwen3-Next follows norm_topk_prob.
        self.norm_topk_prob = True if family == "qwen3_5_moe" else bool(get("norm_topk_prob", True))
        if family == "qwen3_next":
            self.decoder_sparse_step = get("decoder_sparse_step", 1) or 1
            self.mlp_only_layers = list(get("mlp_only_layers", []) or [])
            if self.mlp_only_layers or self.decoder_sparse_step != 1:
                positive_int("intermediate_size")
