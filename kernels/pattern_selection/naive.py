"""Plain PyTorch selection over a varlen batch (the reference for `fused.py`)."""

from collections.abc import Sequence

import torch

from sparsed_vllm.core.pattern import (
    PackedTilePattern,
    generation_start_tile,
    pack_patterns,
    select_pattern,
    tile_importance,
)


def select_pattern_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gen_lengths: Sequence[int],
    block_size: int,
    select: float,
    scale: float,
) -> PackedTilePattern:
    """q `[T, Hq, D]`, k `[T, Hkv, D]`: per-sequence `core.pattern.select_pattern`, packed."""
    bounds = cu_seqlens.tolist()
    patterns = [
        select_pattern(q[s:e], k[s:e], gen, block_size=block_size, select=select, scale=scale)
        for s, e, gen in zip(bounds[:-1], bounds[1:], gen_lengths, strict=True)
    ]
    return pack_patterns(patterns)


def tile_importance_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gen_lengths: Sequence[int],
    block_size: int,
    scale: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sequence: importance over all keys `[Hq, nb, nb]` and over generation keys
    `[Hq, nb, nb - g]` (the two rankings the selection takes its top-k from)."""
    bounds = cu_seqlens.tolist()
    full, gen = [], []
    for s, e, gen_length in zip(bounds[:-1], bounds[1:], gen_lengths, strict=True):
        g = generation_start_tile(e - s, gen_length, block_size)
        full.append(tile_importance(q[s:e], k[s:e], block_size, scale))
        gen.append(tile_importance(q[s:e], k[s:e], block_size, scale, key_begin=g * block_size))
    return full, gen
