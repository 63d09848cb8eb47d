"""LLaDA-8B / LLaDA-1.5 for vLLM: a Llama-style bidirectional transformer (OLMo-derived names).

Loads the real checkpoint's config fields (`d_model`, `n_heads`, ...) and tensor names
(`model.transformer.blocks.N.q_proj`, `attn_out`, `ff_proj` (SiLU gate), `up_proj`, `ff_out`,
`model.transformer.ff_out` as the LM head) by renaming them onto the shared layer layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from sparsed_vllm.model_executor.models.common import DiffusionLM
from vllm.config import VllmConfig

# LLaDA checkpoint name -> the shared (Qwen2-style) layout. ff_proj is the SiLU-gated branch.
_BLOCK_RENAMES = {
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_BLOCK = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_RENAMES = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}


def llada_to_shared_name(name: str) -> str:
    """Map a LLaDA checkpoint tensor name onto the shared layer layout."""
    if name in _TOP_RENAMES:
        return _TOP_RENAMES[name]
    match = _BLOCK.match(name)
    if match is None or match.group(2) not in _BLOCK_RENAMES:
        raise ValueError(f"unexpected LLaDA tensor {name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_RENAMES[part]}.{kind}"


class _SharedLayout:
    """LLaDA config fields under the names the shared backbone reads."""

    def __init__(self, config) -> None:
        if getattr(config, "activation_type", "silu") not in ("silu", "swiglu"):
            raise ValueError(f"unsupported LLaDA activation_type {config.activation_type!r}")
        if getattr(config, "alibi", False) or not getattr(config, "rope", True):
            raise ValueError("only RoPE LLaDA checkpoints are supported (alibi=false, rope=true)")
        self.hidden_size = config.d_model
        self.num_attention_heads = config.n_heads
        self.num_key_value_heads = config.n_kv_heads or config.n_heads
        self.num_hidden_layers = config.n_layers
        self.intermediate_size = config.mlp_hidden_size or config.mlp_ratio * config.d_model
        self.vocab_size = config.embedding_size or config.vocab_size
        self.rms_norm_eps = config.rms_norm_eps
        self.rope_theta = config.rope_theta
        self.max_position_embeddings = config.max_sequence_length
        self.head_dim = config.d_model // config.n_heads
        self.qkv_bias = bool(config.include_bias or getattr(config, "include_qkv_bias", False))
        self.include_bias = bool(config.include_bias)


class LLaDAModelLM(DiffusionLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        layout = _SharedLayout(config)
        if layout.include_bias:
            raise ValueError("LLaDA checkpoints with include_bias=true are not supported")
        tied = bool(getattr(config, "weight_tying", False))
        super().__init__(layout, tied=tied, qkv_bias=layout.qkv_bias)
        self.config = config

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return self.load_shared_weights((llada_to_shared_name(n), t) for n, t in weights)
