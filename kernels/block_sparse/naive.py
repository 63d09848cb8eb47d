"""Plain PyTorch block-sparse attention over a varlen batch (the reference for `fused.py`)."""

import torch

from sparsed_vllm.core.pattern import PackedTilePattern, block_sparse_attention_ref


def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pattern: PackedTilePattern,
    scale: float,
) -> torch.Tensor:
    """q `[T, Hq, D]`, k/v `[T, Hkv, D]`, cu_seqlens `[B+1]` -> `[T, Hq, D]` (fp32 math)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for b, seq_pattern in enumerate(pattern.unpack()):
        s, e = bounds[b], bounds[b + 1]
        out[s:e] = block_sparse_attention_ref(q[s:e], k[s:e], v[s:e], seq_pattern, scale)
    return out
