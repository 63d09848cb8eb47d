"""Llama-style bidirectional decoder layer shared by LLaDA and Dream, from vLLM's TP layers.

Heads are sharded across tensor-parallel ranks by the QKV/row-parallel linears; attention runs
through `DiffusionAttention` (no KV cache, no causal mask).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from sparsed_vllm.vllm_glue.attention import DiffusionAttention


class DiffusionSelfAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_theta: float,
        max_position: int,
        qkv_bias: bool,
        out_bias: bool,
        prefix: str,
    ) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if num_heads % tp:
            raise ValueError(f"{num_heads} attention heads do not split over {tp} TP ranks")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads do not split over {tp} TP ranks")
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden_size,
            head_dim,
            num_heads,
            num_kv_heads,
            bias=qkv_bias,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, hidden_size, bias=out_bias, prefix=f"{prefix}.o_proj"
        )
        self.rotary_emb = get_rope(
            head_dim,
            max_position=max_position,
            is_neox_style=True,
            rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
        )
        self.attn = DiffusionAttention(
            self.num_heads,
            head_dim,
            head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class DiffusionMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class DiffusionDecoderLayer(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        eps: float,
        mlp_bias: bool,
        prefix: str,
        **attn_kwargs,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps=eps)
        self.self_attn = DiffusionSelfAttention(
            hidden_size=hidden_size, prefix=f"{prefix}.self_attn", **attn_kwargs
        )
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=eps)
        self.mlp = DiffusionMLP(hidden_size, intermediate_size, mlp_bias, prefix=f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DiffusionBackbone(nn.Module):
    """Embedding, bidirectional decoder layers, final norm (Qwen2 names; LLaDA maps onto it)."""

    def __init__(self, config, prefix: str, qkv_bias: bool = True) -> None:
        super().__init__()
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DiffusionDecoderLayer(
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                eps=config.rms_norm_eps,
                mlp_bias=False,
                num_heads=config.num_attention_heads,
                num_kv_heads=config.num_key_value_heads,
                head_dim=head_dim,
                rope_theta=config.rope_theta,
                max_position=config.max_position_embeddings,
                qkv_bias=qkv_bias,
                out_bias=False,
                prefix=f"{prefix}.layers.{i}",
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# (name inside the stacked parameter, checkpoint-side name, shard id)
STACKED = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


def load_renamed_weights(
    module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
) -> set[str]:
    """Load (already renamed to Qwen2-style names) weights, merging q/k/v and gate/up shards."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        for stacked, part, shard in STACKED:
            if f".{part}." in name:
                target = name.replace(f".{part}.", f".{stacked}.")
                param = params[target]
                param.weight_loader(param, tensor, shard)
                break
        else:
            target = name
            param = params[target]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(target)
    return loaded


class DiffusionLM(nn.Module):
    """Backbone + LM head with vLLM's model interface; subclasses map their checkpoint's config
    fields (`layout`) and tensor names onto it."""

    def __init__(self, layout, *, tied: bool, qkv_bias: bool) -> None:
        super().__init__()
        self.model = DiffusionBackbone(layout, prefix="model", qkv_bias=qkv_bias)
        self.tied = tied
        self.lm_head = ParallelLMHead(layout.vocab_size, layout.hidden_size, prefix="lm_head")
        if tied:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(layout.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *args, **kwargs):
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_shared_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load weights already renamed to the shared layout (a tied head has no tensor)."""
        weights = (
            (name, tensor)
            for name, tensor in weights
            if not (self.tied and name == "lm_head.weight") and "rotary_emb.inv_freq" not in name
        )
        return load_renamed_weights(self, weights)
