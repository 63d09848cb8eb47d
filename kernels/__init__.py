"""Attention kernels for SparseD: block-sparse attention, fused pattern selection, dense attention.

Importing this package needs neither triton nor CUDA: the Triton ops load on first use, so the
plain PyTorch references (`*_ref`) and the package itself work on CPU-only machines.

- `sparse_attention(q, k, v, cu_seqlens, pattern, scale)`: Triton, over a `PackedTilePattern`.
- `fused_select_pattern(q, k, cu_seqlens, gen_lengths, block_size, select, scale, lse=None)`:
  Triton, SparseD selection without materialising the L x L scores.
- `dense_attention(q, k, v, cu_seqlens, max_seqlen, scale)`: the fastest dense kernel available.
- `cached_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, scale)`: Triton,
  a few query rows per sequence against all its keys in a paged KV cache (split-K).
- `cached_sparse_attention(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, scale,
  patterns, q_starts, q_lens)`: Triton, the same rows attending only to the kept key tiles of
  their query tiles (SparseD on a cached step). Its reference is `cached_attention_ref` with
  `patterns`.
"""

import importlib

from .block_sparse.naive import sparse_attention_ref
from .cached.naive import cached_attention_ref
from .dense import dense_attention, dense_backends
from .pattern_selection.naive import select_pattern_ref, tile_importance_ref

_TRITON_OPS = {
    "cached_attention": ".cached.fused",
    "cached_sparse_attention": ".cached.sparse",
    "sparse_attention": ".block_sparse.fused",
    "fused_select_pattern": ".pattern_selection.fused",
    "fused_tile_importance": ".pattern_selection.fused",
}

__all__ = [
    "cached_attention",
    "cached_attention_ref",
    "cached_sparse_attention",
    "dense_attention",
    "dense_backends",
    "fused_select_pattern",
    "fused_tile_importance",
    "select_pattern_ref",
    "sparse_attention",
    "sparse_attention_ref",
    "tile_importance_ref",
]


def __getattr__(name: str):
    # Lazy: `import triton` happens only when a Triton op is first asked for.
    if name in _TRITON_OPS:
        return getattr(importlib.import_module(_TRITON_OPS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
