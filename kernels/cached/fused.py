"""Triton attention of varlen query rows against K/V in a paged KV cache (split-K, GQA-packed).

One program = `BLOCK_Q` query rows of one sequence times the `PACK` query heads that share one
KV head (the rows of its `[BLOCK_M, D]` tile are (row, head) pairs), over one split of that
sequence's keys. It walks the keys `BLOCK_N` at a time, each block inside one page
(`PAGE % BLOCK_N == 0`), with the FlashAttention-2 online softmax in base 2. Without split-K it
writes the output; with it each split writes a normalised partial output and its log2-sum-exp,
and `_combine_splits_kernel` merges them. kernels/README.md, "cached", derives the launch.
"""

import functools
import math

import torch
import triton
import triton.language as tl

# The same online-softmax update as the block-sparse kernel (one [BLOCK_N, D] key block).
from ..block_sparse.fused import _attend_block
from ..utils import check_paged_inputs, num_sms

LOG2E = math.log2(math.e)
# K + V elements of one key block (`BLOCK_N * D`): 32 KiB in 16-bit per pipeline stage.
BLOCK_KV_ELEMS = 8192
MAX_SPLITS = 64
# A split shorter than this costs more in partial writes and the combine than it gains.
MIN_SPLIT_KEYS = 256
# A grid of at least this many programs per SM is left as it is (no smaller tiles, no split).
FULL_GRID = 0.8


@triton.jit
def _query_block(cu_seqlens_q, n_seqs, n_q_blocks, BLOCK_Q: tl.constexpr, SEARCH: tl.constexpr):
    """This program's sequence and the first of its query rows, relative to the sequence."""
    i_m = tl.program_id(0)
    if SEARCH:
        # Sequence b owns the blocks from cu[b] // BLOCK_Q + b on (at least cdiv(len_b, BLOCK_Q)
        # of them): find the last b whose first block is <= i_m.
        lo = 0
        hi = n_seqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tl.load(cu_seqlens_q + mid) // BLOCK_Q + mid <= i_m:
                lo = mid
            else:
                hi = mid - 1
        q_begin = (i_m - tl.load(cu_seqlens_q + lo) // BLOCK_Q - lo) * BLOCK_Q
        return lo, q_begin
    else:
        return i_m // n_q_blocks, (i_m % n_q_blocks) * BLOCK_Q


@triton.jit
def _split_range(kv_len, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """Keys `[begin, end)` of this program's split: equal chunks, BLOCK_N multiples."""
    if SPLIT:
        n_splits = tl.num_programs(2)
        chunk = tl.maximum(tl.cdiv(tl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
        kv_begin = tl.program_id(2) * chunk
        return kv_begin, tl.minimum(kv_begin + chunk, kv_len)
    else:
        return 0, kv_len


@triton.jit
def _cached_attn_fwd_kernel(
    q,
    k_cache,
    v_cache,
    o,
    o_part,
    lse_part,
    cu_seqlens_q,
    kv_lens,
    block_table,
    qk_scale,
    n_seqs,
    n_q_blocks,
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
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    GROUP: tl.constexpr,
    PACK: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEARCH: tl.constexpr,
    SPLIT: tl.constexpr,
):
    i_hp = tl.program_id(1)
    i_b, q_begin = _query_block(cu_seqlens_q, n_seqs, n_q_blocks, BLOCK_Q, SEARCH)
    bos = tl.load(cu_seqlens_q + i_b)
    q_len = tl.load(cu_seqlens_q + i_b + 1) - bos
    # Searched blocks before cu_seqlens_q[0] (rows the batch does not own) start below 0.
    if (q_begin < 0) | (q_begin >= q_len):
        return
    kv_len = tl.load(kv_lens + i_b)
    kv_begin, kv_end = _split_range(kv_len, BLOCK_N, SPLIT)
    # Tile row r is query row q_begin + r // PACK of head i_hp * PACK + r % PACK.
    o_r = tl.arange(0, BLOCK_M)
    o_tok = q_begin + o_r // PACK
    o_h = i_hp * PACK + o_r % PACK
    m_r = (o_r < BLOCK_Q * PACK) & (o_tok < q_len)
    o_t = (bos + o_tok).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D)
    if SPLIT:
        p_lse = lse_part + tl.program_id(2).to(tl.int64) * stride_ls + o_t * stride_lt + o_h
        if kv_begin >= kv_end:
            # An empty split (short sequence): weight zero in the combine.
            tl.store(p_lse, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=m_r)
            return

    p_q = q + o_t[:, None] * stride_qt + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)
    i_kvh = i_hp * PACK // GROUP
    p_k = k_cache + i_kvh * stride_kh + o_n[:, None] * stride_ks + o_d[None, :]
    p_v = v_cache + i_kvh * stride_vh + o_n[:, None] * stride_vs + o_d[None, :]
    p_bt = block_table + i_b.to(tl.int64) * stride_bt

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    n_full = (kv_end - kv_begin) // BLOCK_N
    for i_it in range(n_full):
        o_kv = kv_begin + i_it * BLOCK_N
        i_page = tl.load(p_bt + o_kv // PAGE).to(tl.int64)
        b_k = tl.load(p_k + i_page * stride_kp + (o_kv % PAGE) * stride_ks)
        b_v = tl.load(p_v + i_page * stride_vp + (o_kv % PAGE) * stride_vs)
        b_m, b_l, b_acc = _attend_block(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, o_n, False)
    # Only the sequence's last key block can be partial; rows past kv_len are never loaded.
    o_kv = kv_begin + n_full * BLOCK_N
    if o_kv < kv_end:
        m_n = o_kv + o_n < kv_end
        i_page = tl.load(p_bt + o_kv // PAGE).to(tl.int64)
        p_kb = p_k + i_page * stride_kp + (o_kv % PAGE) * stride_ks
        p_vb = p_v + i_page * stride_vp + (o_kv % PAGE) * stride_vs
        b_k = tl.load(p_kb, mask=m_n[:, None], other=0.0)
        b_v = tl.load(p_vb, mask=m_n[:, None], other=0.0)
        b_m, b_l, b_acc = _attend_block(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, m_n, True)

    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    if SPLIT:
        p_op = o_part + tl.program_id(2).to(tl.int64) * stride_ps + o_t[:, None] * stride_pt
        tl.store(p_op + o_h[:, None] * stride_ph + o_d[None, :], b_o, mask=m_r[:, None])
        tl.store(p_lse, b_m + tl.math.log2(b_l), mask=m_r)
    else:
        p_o = o + o_t[:, None] * stride_ot + o_h[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _combine_splits_kernel(
    o_part,
    lse_part,
    o,
    cu_seqlens_q,
    n_seqs,
    n_splits,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    stride_ot,
    stride_oh,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out = sum_s 2^(lse_s - lse) o_s over the splits of one (query row, head)."""
    i_t, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    # Rows outside the batch (padding) have no partials and are left as they are.
    if (i_t < tl.load(cu_seqlens_q)) | (i_t >= tl.load(cu_seqlens_q + n_seqs)):
        return
    o_s = tl.arange(0, BLOCK_S).to(tl.int64)
    o_d = tl.arange(0, D)
    p_lse = lse_part + o_s * stride_ls + i_t * stride_lt + i_h
    b_lse = tl.load(p_lse, mask=o_s < n_splits, other=float("-inf"))
    # Empty splits carry -inf; a row with no keys at all has no split with weight and stays 0.
    m_s = b_lse > float("-inf")
    b_w = tl.where(m_s, tl.math.exp2(b_lse - tl.max(b_lse, 0)), 0.0)
    p_op = o_part + o_s[:, None] * stride_ps + i_t * stride_pt + i_h * stride_ph + o_d[None, :]
    b_o = tl.load(p_op, mask=m_s[:, None], other=0.0)
    b_sum = tl.sum(b_w, 0)
    b_out = tl.sum(b_o * b_w[:, None], 0) / tl.where(b_sum > 0, b_sum, 1.0)
    tl.store(o + i_t * stride_ot + i_h * stride_oh + o_d, b_out.to(o.dtype.element_ty))


def default_config(block_m: int, head_dim: int, page_size: int) -> dict:
    """Launch choice for a `BLOCK_M`-row tile: 32 KiB of K + V per pipeline stage."""
    return {
        "BLOCK_N": min(page_size, BLOCK_KV_ELEMS // head_dim),
        "num_warps": 8 if block_m >= 128 else 4,
        "num_stages": 3,
    }


def default_block_m(rows: int, pack: int, n_programs, num_sms: int) -> int:
    """The tile height: all of a sequence's (row, head) pairs, 16 to 128.

    When that grid is too small for the GPU but a lower tile (down to 64 rows, the smallest
    wgmma tile) fills it, the lower one wins: no split-K, so no partials to write and combine.
    """
    block_m = min(128, max(16, triton.next_power_of_2(rows * pack), triton.next_power_of_2(pack)))
    lower, full = block_m // 2, FULL_GRID * num_sms
    if lower >= max(64, pack) and n_programs(block_m) < full <= n_programs(lower):
        return lower
    return block_m


@functools.cache
def num_splits(base_programs: int, max_kv_len: int, num_sms: int) -> int:
    """Split-K factor: the fewest splits whose grid fills the GPU's waves about as well as any.

    `base_programs` = (query blocks) x (head groups). A grid that fills most SMs on its own is not
    split; otherwise s splits give `base * s` programs, and wave efficiency `n / (ceil(n / SMs) *
    SMs)` is maximised over s (within 5%, fewer splits win: less to write and combine), with at
    most MAX_SPLITS splits of at least MIN_SPLIT_KEYS keys each.
    """
    if base_programs >= FULL_GRID * num_sms:
        return 1
    limit = max(1, min(MAX_SPLITS, max_kv_len // MIN_SPLIT_KEYS))
    eff = {}
    for s in range(1, limit + 1):
        n = base_programs * s
        eff[s] = n / (triton.cdiv(n, num_sms) * num_sms)
    best = max(eff.values())
    return min(s for s, e in eff.items() if e >= 0.95 * best)


def launch_plan(
    n_tokens: int,
    n_seqs: int,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    page_size: int,
    max_seqlen_q: int | None,
    max_kv_len: int,
    num_sms: int,
    config: dict | None = None,
) -> dict:
    """Tiles, GQA packing, split count and grid of one call, from host-side ints only."""
    user = dict(config or {})
    group = n_heads // n_kv
    pack = group if user.pop("PACK_GQA", True) and group <= 128 else 1
    rows = max_seqlen_q or triton.cdiv(n_tokens, n_seqs)

    def n_programs(block_m):
        # Useful programs if the rows are spread evenly (the searched grid has up to B more).
        return n_seqs * triton.cdiv(rows, block_m // pack) * (n_heads // pack)

    block_m = user.pop("BLOCK_M", None) or default_block_m(rows, pack, n_programs, num_sms)
    pack = pack if pack <= block_m else 1
    cfg = {**default_config(block_m, head_dim, page_size), **user, "BLOCK_M": block_m}
    if cfg["BLOCK_N"] > page_size or page_size % cfg["BLOCK_N"]:
        raise ValueError(f"BLOCK_N {cfg['BLOCK_N']} must divide the page size {page_size}")
    block_q = block_m // pack
    if max_seqlen_q is None:
        n_q_blocks, grid_q = 0, n_tokens // block_q + n_seqs
    else:
        n_q_blocks = max(1, triton.cdiv(max_seqlen_q, block_q))
        grid_q = n_seqs * n_q_blocks
    if cfg.get("num_splits") is None:
        cfg["num_splits"] = num_splits(n_programs(block_m), max_kv_len, num_sms)
    grid = (grid_q, n_heads // pack, cfg["num_splits"])
    return {**cfg, "PACK": pack, "BLOCK_Q": block_q, "n_q_blocks": n_q_blocks, "grid": grid}


def cached_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_kv_len: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Bidirectional attention of each sequence's query rows to all its keys in a paged cache.

    q `[Tq, Hq, D]` (sequence b owns rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]`, int32 `[B+1]`),
    k/v_cache `[num_pages, PAGE, Hkv, D]` (head_dim contiguous; may be views of one cache),
    kv_lens int32 `[B]`, block_table int32 `[B, max_pages]`: position p of sequence b is row
    `p % PAGE` of page `block_table[b, p // PAGE]`. Returns `[Tq, Hq, D]` (into `out` if given;
    rows outside `cu_seqlens_q[0]:cu_seqlens_q[-1]`, e.g. padding, are not written).
    Host-side hints, no device sync: `max_seqlen_q` (an upper bound on any sequence's query rows:
    a dense grid instead of a searched one) and `max_kv_len` (sizes the split-K; default the
    block table's width in keys). `config` overrides `BLOCK_M`, `BLOCK_N`, `PACK_GQA`,
    `num_splits`, `num_warps`, `num_stages`.
    """
    check_paged_inputs(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, out)
    out = torch.empty_like(q) if out is None else out
    n_tokens, n_heads, head_dim = q.shape
    n_seqs, page_size, n_kv = kv_lens.shape[0], k_cache.shape[1], k_cache.shape[2]
    if n_tokens == 0 or n_seqs == 0:
        return out
    max_kv_len = max_kv_len or block_table.shape[1] * page_size
    plan = launch_plan(
        *(n_tokens, n_seqs, n_heads, n_kv, head_dim, page_size),
        *(max_seqlen_q, max_kv_len, num_sms(q), config),
    )
    splits, grid = plan.pop("num_splits"), plan.pop("grid")
    o_part, lse_part, part_strides = split_buffers(q, out, splits)
    _cached_attn_fwd_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        o_part,
        lse_part,
        cu_seqlens_q,
        kv_lens,
        block_table,
        scale * LOG2E,
        n_seqs,
        plan.pop("n_q_blocks"),
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        *part_strides,
        GROUP=n_heads // n_kv,
        D=head_dim,
        PAGE=page_size,
        SEARCH=max_seqlen_q is None,
        SPLIT=splits > 1,
        **plan,
    )
    if splits > 1:
        combine_splits(o_part, lse_part, out, cu_seqlens_q, n_seqs, splits, part_strides)
    return out


def split_buffers(q: torch.Tensor, out: torch.Tensor, splits: int):
    """fp32 partial outputs `[S, Tq, Hq, D]` and log2-sum-exps `[S, Tq, Hq]` of a split-K launch,
    and their strides as the kernels take them; without a split, `out` stands in (unused)."""
    if splits == 1:
        return out, out, (0,) * 5
    o_part = torch.empty(splits, *q.shape, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(splits, *q.shape[:2], dtype=torch.float32, device=q.device)
    return o_part, lse_part, (*o_part.stride()[:3], *lse_part.stride()[:2])


def combine_splits(o_part, lse_part, out, cu_seqlens_q, n_seqs, splits, part_strides) -> None:
    """Merge the splits' partials into `out`, one program per (query row, head)."""
    n_tokens, n_heads, head_dim = out.shape
    _combine_splits_kernel[(n_tokens, n_heads)](
        o_part,
        lse_part,
        out,
        cu_seqlens_q,
        n_seqs,
        splits,
        *part_strides,
        out.stride(0),
        out.stride(1),
        D=head_dim,
        BLOCK_S=triton.next_power_of_2(splits),
        num_warps=4,
    )
