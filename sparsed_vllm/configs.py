"""Hugging Face config classes for LLaDA and Dream, so no remote code is needed.

Both load the published checkpoints' config.json unchanged (unknown fields are kept as attributes)
and expose the standard names vLLM reads (`hidden_size`, `num_attention_heads`, `head_dim`, ...).
`rope_theta` stays a plain attribute: transformers 5 moved it into `rope_parameters` for its own
model classes, and vLLM's `patch_rope_parameters` rebuilds `rope_parameters` from it.

Importing this module pulls in transformers only (no torch model code, no vLLM).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PretrainedConfig

LLADA_MODEL_TYPE = "llada"
DREAM_MODEL_TYPE = "Dream"
LLADA_ARCHITECTURE = "LLaDAModelLM"
DREAM_ARCHITECTURE = "DreamModel"

# OLMo-heritage fields of the published LLaDA config.json that do not change the forward pass of
# a `block_type: llama` model; kept so a written config.json matches the real one field for field.
LLADA_HERITAGE_DEFAULTS: dict[str, Any] = {
    "alibi": False,
    "alibi_bias_max": 8.0,
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_with_affine": True,
    "mlp_ratio": 4,
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope_full_precision": True,
    "scale_logits": False,
}

LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}
DREAM_AUTO_MAP = {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
}


def _default_rope_parameters(rope_theta: float, given: dict | None) -> dict[str, Any]:
    """Plain RoPE only: the published LLaDA and Dream checkpoints use no scaling."""
    params = dict(given or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported RoPE scaling {given!r}: only plain RoPE is implemented")
    params["rope_type"] = "default"
    params["rope_theta"] = float(rope_theta)
    params.pop("type", None)
    return params


def _check_head_dim(hidden_size: int, num_heads: int, head_dim: int | None) -> None:
    """A config.json may carry `head_dim`; it must equal hidden_size // num_heads here."""
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
    if head_dim is not None and head_dim != hidden_size // num_heads:
        raise ValueError(f"head_dim {head_dim} != hidden size {hidden_size} // heads {num_heads}")


class LLaDAConfig(PretrainedConfig):
    """LLaDA-8B / LLaDA-1.5 config (OLMo-style field names); defaults are the 8B values."""

    model_type = LLADA_MODEL_TYPE
    # vLLM and transformers read these standard names; they alias the OLMo fields.
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
    }
    # Masked diffusion LM: attention is bidirectional.
    is_causal = False

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = 32,
        n_layers: int = 32,
        mlp_hidden_size: int | None = 12288,
        activation_type: str = "silu",
        block_type: str = "llama",
        rope: bool = True,
        rope_theta: float = 500000.0,
        max_sequence_length: int = 4096,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        rms_norm_eps: float = 1e-5,
        layer_norm_type: str = "rms",
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        weight_tying: bool = False,
        mask_token_id: int = 126336,
        eos_token_id: int | None = 126081,
        pad_token_id: int | None = 126081,
        bos_token_id: int | None = None,
        use_cache: bool = False,
        head_dim: int | None = None,
        rope_parameters: dict | None = None,
        rope_scaling: dict | None = None,
        **kwargs: Any,
    ) -> None:
        for key, value in LLADA_HERITAGE_DEFAULTS.items():
            kwargs.setdefault(key, value)
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.n_layers = n_layers
        # OLMo falls back to mlp_ratio * d_model when mlp_hidden_size is null.
        self.mlp_hidden_size = mlp_hidden_size or kwargs["mlp_ratio"] * d_model
        self.activation_type = activation_type
        self.block_type = block_type
        self.rope = rope
        self.rope_theta = float(rope_theta)
        self.max_sequence_length = max_sequence_length
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size if embedding_size is not None else vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.layer_norm_type = layer_norm_type
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        # Set here, not via kwargs: transformers 5 drops `use_cache` passed to the base class.
        self.use_cache = use_cache
        _check_head_dim(d_model, n_heads, head_dim)
        self.rope_parameters = _default_rope_parameters(
            self.rope_theta, rope_scaling or rope_parameters
        )
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        """Per-head size; LLaDA's config has no field for it."""
        return self.d_model // self.n_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        # Derived, so only a consistent value may be "set" (e.g. by config overrides).
        _check_head_dim(self.d_model, self.n_heads, value)


class DreamConfig(PretrainedConfig):
    """Dream-v0-7B config (Qwen2 fields + `mask_token_id`); defaults are the 7B values."""

    model_type = DREAM_MODEL_TYPE
    # Masked diffusion LM: attention is bidirectional.
    is_causal = False

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int | None = 4,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: int = 151666,
        pad_token_id: int | None = 151643,
        bos_token_id: int | None = 151643,
        eos_token_id: int | None = 151643,
        head_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        )
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        # Set here, not via kwargs: transformers 5 drops `use_cache` passed to the base class.
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.rope_theta = float(rope_theta)
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        _check_head_dim(hidden_size, num_attention_heads, head_dim)
        self.rope_parameters = _default_rope_parameters(
            self.rope_theta, rope_scaling or rope_parameters
        )
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        """Per-head size; Qwen2-style configs derive it from hidden_size."""
        return self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        # Derived, so only a consistent value may be "set" (e.g. by config overrides).
        _check_head_dim(self.hidden_size, self.num_attention_heads, value)


def register_configs() -> None:
    """Register both config classes with `transformers.AutoConfig` (idempotent)."""
    AutoConfig.register(LLADA_MODEL_TYPE, LLaDAConfig, exist_ok=True)
    AutoConfig.register(DREAM_MODEL_TYPE, DreamConfig, exist_ok=True)
