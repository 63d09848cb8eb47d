"""Triton SparseD attention of cached windows: each query row reads only the kept key tiles of
its query tile, from the sequence's KV pages (split-K over the kept-tile list).

The rows of a cached step's window (a block of the canvas, `q_starts[b]` on) fall in one or two
query tiles of the sequence's pattern. The host cuts each window into work items, rows of one
query tile (`windows.WindowPlan`). One program = one item x one head group x one split of the
group's kept key tiles for that query tile; it walks them `BLOCK_N` keys at a time (each block
inside one page: `BLOCK_N` divides the page and the tile) with the FlashAttention-2 online
softmax, masking keys past the sequence's length. Under GQA a program's rows are (row, head)
pairs of all the query heads of one KV head, as in the dense cached kernel, and the group's list
is the union of their kept tiles: a row whose head does not keep a tile masks it out
(`windows.window_lists`). Splits write partial outputs and their log2-sum-exp, merged by the dense
cached kernel's combine. The reference is `naive.cached_attention_ref` with `patterns`;
kernels/README.md, "cached-sparse", has the measurements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsed_vllm.core.pattern import TilePattern

from ..utils import check_paged_inputs, num_sms
from .fused import LOG2E, combine_splits, num_splits, split_buffers
from .windows import WindowLists, WindowPlan, pack_lists, plan_windows, window_lists

# K + V elements of one key block, as in the dense cached kernel.
BLOCK_KV_ELEMS = 8192


@triton.jit
def _attend_rows(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, m_s):
    """One online-softmax update with a `[BLOCK_N, D]` key block under a `[BLOCK_M, BLOCK_N]` mask;
    a row may have every key masked so far (its max stays -inf and its sums 0)."""
    b_s = tl.where(m_s, tl.dot(b_q, tl.trans(b_k)), float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
    b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_p = tl.math.exp2(b_s * qk_scale - b_ms[:, None])
    b_alpha = tl.math.exp2(b_m - b_ms)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None])
    return b_mn, b_l, b_acc


@triton.jit
def _cached_sparse_fwd_kernel(
    q,
    k_cache,
    v_cache,
    o,
    o_part,
    lse_part,
    items,
    kv_indices,
    kv_counts,
    head_bits,
    cu_seqlens_q,
    kv_lens,
    block_table,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_ih,
    stride_it,
    stride_ch,
    stride_ct,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    GROUP: tl.constexpr,
    PACK: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    SUB_N: tl.constexpr = TILE // BLOCK_N
    # Head group i_g: query heads i_g * PACK ... (one KV head's when PACK > 1, else one head).
    i_item, i_g = tl.program_id(0), tl.program_id(1)
    p_item = items + i_item * 4
    i_b = tl.load(p_item)
    row_begin = tl.load(p_item + 1)
    row_end = tl.load(p_item + 2)
    i_tile = tl.load(p_item + 3)
    bos = tl.load(cu_seqlens_q + i_b)
    kv_len = tl.load(kv_lens + i_b)
    n_kept = tl.load(kv_counts + i_g * stride_ch + i_tile * stride_ct)
    if SPLIT:
        # Equal shares of this (tile, group)'s kept list; a share may be empty.
        chunk = tl.cdiv(n_kept, tl.num_programs(2))
        e_begin = tl.program_id(2) * chunk
        e_end = tl.minimum(e_begin + chunk, n_kept)
    else:
        e_begin = 0
        e_end = n_kept

    # Tile row r is query row row_begin + r // PACK of head i_g * PACK + r % PACK.
    o_r = tl.arange(0, BLOCK_M)
    o_tok = row_begin + o_r // PACK
    o_h = i_g * PACK + o_r % PACK
    m_r = (o_r < BLOCK_Q * PACK) & (o_tok < row_end)
    o_t = (bos + o_tok).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D)
    p_q = q + o_t[:, None] * stride_qt + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)
    i_kvh = i_g * PACK // GROUP
    p_k = k_cache + i_kvh * stride_kh + o_n[:, None] * stride_ks + o_d[None, :]
    p_v = v_cache + i_kvh * stride_vh + o_n[:, None] * stride_vs + o_d[None, :]
    p_bt = block_table + i_b.to(tl.int64) * stride_bt
    p_idx = kv_indices + i_g * stride_ih + i_tile * stride_it
    p_bits = head_bits + i_g * stride_ih + i_tile * stride_it

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for i_it in range((e_end - e_begin) * SUB_N):
        i_e = e_begin + i_it // SUB_N
        o_kv = tl.load(p_idx + i_e) * TILE + (i_it % SUB_N) * BLOCK_N
        # Only the sequence's last tile can be partial: its blocks are masked past kv_len.
        m_n = o_kv + o_n < kv_len
        i_page = tl.load(p_bt + tl.minimum(o_kv, kv_len - 1) // PAGE).to(tl.int64)
        b_k = tl.load(
            p_k + i_page * stride_kp + (o_kv % PAGE) * stride_ks, mask=m_n[:, None], other=0.0
        )
        b_v = tl.load(
            p_v + i_page * stride_vp + (o_kv % PAGE) * stride_vs, mask=m_n[:, None], other=0.0
        )
        if PACK > 1:
            # Rows of the heads that did not keep this tile see none of its keys.
            m_h = ((tl.load(p_bits + i_e) >> (o_r % PACK)) & 1) != 0
            m_s = m_h[:, None] & m_n[None, :]
        else:
            m_s = (o_r >= 0)[:, None] & m_n[None, :]
        b_m, b_l, b_acc = _attend_rows(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, m_s)

    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    if SPLIT:
        p_op = o_part + tl.program_id(2).to(tl.int64) * stride_ps + o_t[:, None] * stride_pt
        tl.store(p_op + o_h[:, None] * stride_ph + o_d[None, :], b_o, mask=m_r[:, None])
        # A row without keys in this share has l = 0: log2(0) = -inf gives it no weight.
        p_lse = lse_part + tl.program_id(2).to(tl.int64) * stride_ls + o_t * stride_lt + o_h
        tl.store(p_lse, b_m + tl.math.log2(b_l), mask=m_r)
    else:
        p_o = o + o_t[:, None] * stride_ot + o_h[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None])


def default_block_m(rows: int, pack: int) -> int:
    """Tile height: a window's rows times the heads packed with them, 16 to 128."""
    return min(128, max(16, triton.next_power_of_2(rows * pack), triton.next_power_of_2(pack)))


def default_config(block_m: int, head_dim: int, page_size: int, tile: int) -> dict:
    """Key blocks of 32 KiB of K + V at most, inside one page and one tile."""
    return {
        "BLOCK_N": min(page_size, tile, BLOCK_KV_ELEMS // head_dim),
        "num_warps": 8 if block_m >= 128 else 4,
        "num_stages": 3,
    }


def head_pack(n_heads: int, n_kv: int) -> int:
    """Query heads per program: a KV head's whole group under GQA, else one."""
    return n_heads // n_kv


def cached_sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    patterns: list[TilePattern],
    q_starts: list[int],
    q_lens: list[int],
    out: torch.Tensor | None = None,
    config: dict | None = None,
    plan: WindowPlan | None = None,
    lists: WindowLists | None = None,
) -> torch.Tensor:
    """SparseD attention of each sequence's window rows to the kept key tiles of their query
    tiles, keys read from a paged cache.

    q, k/v_cache, cu_seqlens_q, kv_lens and block_table as in `cached_attention`; per sequence its
    `TilePattern` (same tile size for all, over the sequence's `kv_lens[b]` keys), the position
    of its window's first row (`q_starts`) and its row count (`q_lens`, host ints matching
    `cu_seqlens_q`). Returns `[Tq, Hq, D]` (into `out` if given). A caller that runs many layers
    over the same windows passes `plan` (`windows.plan_windows(q_lens, q_starts, tile,
    block_m // pack, device)`) and `lists` (`windows.window_lists` of each pattern, packed), built
    once. `config` overrides `BLOCK_M`, `BLOCK_N`, `num_splits`, `num_warps`, `num_stages`.
    """
    check_paged_inputs(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, out)
    n_seqs = kv_lens.shape[0]
    if not len(patterns) == len(q_starts) == len(q_lens) == n_seqs:
        raise ValueError(
            f"{n_seqs} sequences but {len(patterns)} patterns, {len(q_starts)} starts, "
            f"{len(q_lens)} row counts"
        )
    tile = patterns[0].block_size if patterns else 0
    if any(p.block_size != tile for p in patterns) or tile not in (16, 32, 64, 128):
        raise ValueError(f"patterns must share one tile size of 16-128, got {tile}")
    if any(p.kv_indices.shape[0] != q.shape[1] for p in patterns):
        raise ValueError(f"patterns must have one entry per query head ({q.shape[1]})")
    out = torch.empty_like(q) if out is None else out
    n_tokens, n_heads, head_dim = q.shape
    page_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    if n_tokens == 0:
        return out
    pack = head_pack(n_heads, n_kv)
    user = dict(config or {})
    block_m = user.pop("BLOCK_M", None) or default_block_m(max(q_lens), pack)
    if block_m < pack:
        raise ValueError(f"BLOCK_M {block_m} is smaller than the {pack} heads of a KV group")
    cfg = {**default_config(block_m, head_dim, page_size, tile), **user}
    block_n = cfg["BLOCK_N"]
    if page_size % block_n or tile % block_n:
        raise ValueError(f"BLOCK_N {block_n} must divide the page {page_size} and tile {tile}")
    block_q = block_m // pack
    if plan is None:
        plan = plan_windows(q_lens, q_starts, tile, block_q, q.device)
    elif plan.block_q != block_q or plan.tile != tile:
        raise ValueError(f"plan is for {plan.block_q} rows of tile {plan.tile}, not {block_q}")
    if lists is None:
        lists = pack_lists(
            [
                window_lists(p, first, end, n_kv)
                for p, (first, end) in zip(patterns, plan.tiles, strict=True)
                if end > first
            ]
        )
    if lists.kv_indices.device != q.device:
        raise ValueError("the patterns must live on q's device")
    splits = cfg.pop("num_splits", None)
    if splits is None:
        max_keys = lists.kv_indices.shape[-1] * tile
        splits = num_splits(plan.num_items * (n_heads // pack), max_keys, num_sms(q))
    o_part, lse_part, part_strides = split_buffers(q, out, splits)
    bits = lists.head_bits if lists.head_bits is not None else lists.kv_indices
    if bits.stride() != lists.kv_indices.stride():
        raise ValueError("head_bits must be laid out like kv_indices")
    _cached_sparse_fwd_kernel[(plan.num_items, n_heads // pack, splits)](
        q,
        k_cache,
        v_cache,
        out,
        o_part,
        lse_part,
        plan.items,
        lists.kv_indices,
        lists.kv_counts,
        bits,
        cu_seqlens_q,
        kv_lens,
        block_table,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        lists.kv_indices.stride(0),
        lists.kv_indices.stride(1),
        lists.kv_counts.stride(0),
        lists.kv_counts.stride(1),
        *part_strides,
        GROUP=n_heads // n_kv,
        PACK=pack,
        D=head_dim,
        PAGE=page_size,
        TILE=tile,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        SPLIT=splits > 1,
        **cfg,
    )
    if splits > 1:
        combine_splits(o_part, lse_part, out, cu_seqlens_q, n_seqs, splits, part_strides)
    return out
