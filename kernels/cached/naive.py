"""Plain PyTorch attention of varlen query rows against a paged KV cache (the reference for
`fused.py`, and the exact path on CPU)."""

import itertools

import torch
import torch.nn.functional as F

from sparsed_vllm.core.pattern import TilePattern


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Logical positions `0..kv_len-1` of one sequence as a contiguous `[kv_len, Hkv, D]`.

    cache `[num_pages, PAGE, Hkv, D]`; block_table_row `[max_pages]`: only its first
    `ceil(kv_len / PAGE)` entries are read.
    """
    n_pages = -(-kv_len // cache.shape[1])
    pages = block_table_row[:n_pages].long()
    return cache.index_select(0, pages).flatten(0, 1)[:kv_len]


def cached_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    patterns: list[TilePattern | None] | None = None,
    q_starts: list[int] | None = None,
) -> torch.Tensor:
    """Bidirectional attention of each sequence's query rows to all its cached keys (fp32 math).

    q `[Tq, Hq, D]` (sequence b owns rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]`), k/v_cache
    `[num_pages, PAGE, Hkv, D]`, kv_lens int32 `[B]`, block_table int32 `[B, max_pages]`:
    position p of sequence b is row `p % PAGE` of page `block_table[b, p // PAGE]`.
    With SparseD `patterns` (per sequence, None: dense), the rows of sequence b are the
    positions `q_starts[b]`, `q_starts[b] + 1`, ... and each attends only to the kept key tiles
    of its query tile (softmax over those keys).
    Returns `[Tq, Hq, D]` in q's dtype; rows of a sequence without keys are zero.
    """
    out = torch.empty_like(q)
    bounds, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b, (s, e) in enumerate(itertools.pairwise(bounds)):
        if e == s:
            continue
        if lens[b] == 0:
            out[s:e] = 0
            continue
        k, v = (gather_pages(c, block_table[b], lens[b]) for c in (k_cache, v_cache))
        qb = q[s:e].transpose(0, 1).float()  # [Hq, Lq, D]
        kb, vb = (t.transpose(0, 1).float() for t in (k, v))  # [Hkv, kv_len, D]
        mask = None
        if patterns is not None and patterns[b] is not None:
            mask = _window_token_mask(patterns[b], q_starts[b], e - s, lens[b])
        ob = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[s:e] = ob.transpose(0, 1).to(q.dtype)
    return out


def _window_token_mask(pattern: TilePattern, start: int, rows: int, kv_len: int) -> torch.Tensor:
    """Bool `[Hq, rows, kv_len]`: keys in the kept tiles of each row's query tile."""
    size = pattern.block_size
    query_tiles = torch.arange(start, start + rows, device=pattern.kv_indices.device) // size
    kept = pattern.to_dense_mask()[:, query_tiles]  # [Hq, rows, nb]
    return kept.repeat_interleave(size, dim=-1)[..., :kv_len]
