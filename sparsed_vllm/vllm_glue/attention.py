"""Attention backend for diffusion LMs: bidirectional varlen attention, with or without a KV cache.

Why it exists: vLLM's attention layers find their per-step metadata through the forward context
and call `impl.forward(layer, q, k, v, kv_cache, metadata, output)`. The diffusion model runner
builds the step's `core.staged.AttentionBatch` itself (its metadata here); this backend hands
each layer's call to the vLLM-free executor `core.staged.staged_attention`, which makes one call
per stage kind. The models pass this backend to their `DiffusionAttention` layers directly, so it
is used on every platform (the CPU platform would otherwise always pick CPU_ATTN).
vLLM internals used (0.32): AttentionBackend/AttentionImpl signatures, Attention.__init__'s use of
`get_name()` as an AttentionBackendEnum member, the layer's `kv_cache` attribute (bound by the
diffusion model runner, passed to `impl.forward` by vLLM's attention op).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionBackend, AttentionImpl, AttentionType

from sparsed_vllm.core.staged import AttentionBatch, staged_attention

BACKEND_NAME = "CUSTOM"


class DiffusionAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.ENCODER_ONLY,
        kv_sharing_target_layer_name: str | None = None,
    ) -> None:
        if attn_type != AttentionType.ENCODER_ONLY:
            raise ValueError(f"diffusion attention is bidirectional only, got {attn_type}")
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise ValueError("alibi, sliding windows and soft-capping are not supported")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionBatch,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None:
            # Shape-only passes (profiling) carry no batch description.
            output.zero_()
            return output
        return staged_attention(
            layer.layer_index, query, key, value, kv_cache, attn_metadata, self.scale, output
        )


class DiffusionAttentionBackend(AttentionBackend):
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return DiffusionAttentionImpl

    @staticmethod
    def get_builder_cls():
        # The diffusion runner builds metadata directly; vLLM's builder path is never taken.
        raise NotImplementedError("DiffusionAttentionBackend has no metadata builder")

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, *args, **kwargs):
        """Per layer: keys and values of every page, `[2, pages, page_size, Hkv, D]`."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.ENCODER_ONLY


class DiffusionAttention(Attention):
    """Bidirectional attention layer. vLLM sees no KV cache in it (`get_kv_cache_spec` is None):
    the diffusion model runner declares and binds the cache of cached decoding itself."""

    def __init__(self, num_heads: int, head_size: int, scale: float, **kwargs) -> None:
        super().__init__(
            num_heads=num_heads,
            head_size=head_size,
            scale=scale,
            attn_backend=DiffusionAttentionBackend,
            attn_type=AttentionType.ENCODER_ONLY,
            **kwargs,
        )
        # Patterns are stored per layer: the index comes from the layer's name.
        self.layer_index = extract_layer_index(kwargs["prefix"])

    def get_kv_cache_spec(self, vllm_config):
        return None
