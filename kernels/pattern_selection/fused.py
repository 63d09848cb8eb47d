"""Triton SparseD pattern selection: tile importance without materialising the L x L scores.

Two passes over Q K^T per query head (README.md beside this file has the derivation):
1. `_row_stats_kernel`: per query row, the log2-sum-exp of the scaled scores over all keys and over
   the generation keys (tiles >= g) alone. When the caller passes the LSE of a dense attention call
   with the same scale, only the generation keys (a small range) are scanned.
2. `_tile_mass_kernel`: per (query tile, key tile), the summed probabilities
   `sum exp2(s - lse2)` over the tile, divided by `TILE**2` (the mean over the padded tile).
Top-k then runs on the small `[Hq, nq, nb]` matrices.
"""

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from sparsed_vllm.core.pattern import (
    PackedTilePattern,
    TilePattern,
    default_scale,
    generation_start_tile,
    num_kept_tiles,
    num_tiles,
    pack_patterns,
    topk_tile_mask,
)

from ..utils import check_tile, check_varlen_qkv, tile_to_sequence

LOG2E = math.log2(math.e)


@triton.jit
def _stats_update(b_s, b_m, b_l):
    """Running row max / row sum of exp2 for a `[BLOCK_M, BLOCK_N]` block of log2-scores."""
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_l = b_l * tl.math.exp2(b_m - b_mn) + tl.sum(tl.math.exp2(b_s - b_mn[:, None]), 1)
    return b_mn, b_l


@triton.jit
def _row_stats_kernel(
    q,
    k,
    lse,
    lse_gen,
    tile_seq,
    q_tile_offsets,
    cu_seqlens,
    gen_tiles,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_lh,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALL_KEYS: tl.constexpr,
):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    SUB_M: tl.constexpr = TILE // BLOCK_M
    i_t = i_m // SUB_M
    i_b = tl.load(tile_seq + i_t)
    bos = tl.load(cu_seqlens + i_b)
    seqlen = tl.load(cu_seqlens + i_b + 1) - bos
    q_begin = (i_t - tl.load(q_tile_offsets + i_b)) * TILE + (i_m % SUB_M) * BLOCK_M
    if q_begin >= seqlen:
        return
    gen_begin = tl.load(gen_tiles + i_b) * TILE
    o_m = q_begin + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D)
    m_m = o_m < seqlen
    p_q = (
        q + bos.to(tl.int64) * stride_qt + o_m[:, None] * stride_qt + i_h * stride_qh + o_d[None, :]
    )
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    p_k = k + bos.to(tl.int64) * stride_kt + (i_h // GROUP) * stride_kh + o_d[None, :]

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_mg = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_lg = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALL_KEYS:
        # Prompt keys [0, gen_begin) are all inside the sequence: no masks. The next block's
        # Q K^T is issued before this block's update (as in `_tile_mass_kernel`).
        if gen_begin > 0:
            b_s = tl.dot(b_q, tl.trans(tl.load(p_k + o_n[:, None] * stride_kt))) * qk_scale
            for i_n in range(BLOCK_N, gen_begin, BLOCK_N):
                b_sn = tl.dot(b_q, tl.trans(tl.load(p_k + (i_n + o_n[:, None]) * stride_kt)))
                b_m, b_l = _stats_update(b_s, b_m, b_l)
                b_s = b_sn * qk_scale
            b_m, b_l = _stats_update(b_s, b_m, b_l)
    for i_n in range(gen_begin, seqlen, BLOCK_N):
        m_n = i_n + o_n < seqlen
        b_k = tl.load(p_k + (i_n + o_n[:, None]) * stride_kt, mask=m_n[:, None], other=0.0)
        b_s = tl.where(m_n[None, :], tl.dot(b_q, tl.trans(b_k)) * qk_scale, float("-inf"))
        b_mg, b_lg = _stats_update(b_s, b_mg, b_lg)
        if ALL_KEYS:
            b_m, b_l = _stats_update(b_s, b_m, b_l)
    tl.store(lse_gen + i_h * stride_lh + bos + o_m, b_mg + tl.math.log2(b_lg), mask=m_m)
    if ALL_KEYS:
        tl.store(lse + i_h * stride_lh + bos + o_m, b_m + tl.math.log2(b_l), mask=m_m)


@triton.jit
def _add_block_mass(b_s, b_lse, b_sum, p_mass, i_it, inv_area, SUB_N: tl.constexpr):
    """Add one whole key block's probability mass; store and reset at the tile's last block."""
    b_sum += tl.sum(tl.sum(tl.math.exp2(b_s - b_lse[:, None]), 1), 0)
    tile_done = i_it % SUB_N == SUB_N - 1
    tl.store(p_mass + i_it // SUB_N, b_sum * inv_area, mask=tile_done)
    return tl.where(tile_done, 0.0, b_sum)


@triton.jit
def _tile_mass_kernel(
    q,
    k,
    lse,
    lse_gen,
    mass,
    mass_gen,
    tile_seq,
    q_tile_offsets,
    cu_seqlens,
    gen_tiles,
    qk_scale,
    inv_area,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_lh,
    stride_mh,
    stride_mt,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    SUB_N: tl.constexpr = TILE // BLOCK_N
    i_b = tl.load(tile_seq + i_t)
    bos = tl.load(cu_seqlens + i_b)
    seqlen = tl.load(cu_seqlens + i_b + 1) - bos
    g = tl.load(gen_tiles + i_b)
    o_m = (i_t - tl.load(q_tile_offsets + i_b)) * TILE + tl.arange(0, TILE)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D)
    m_m = o_m < seqlen
    p_q = q + bos.to(tl.int64) * stride_qt + o_m[:, None] * stride_qt + i_h * stride_qh + o_d
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    # Rows past the sequence get lse = +inf, so their probabilities vanish without a mask.
    b_lse = tl.load(lse + i_h * stride_lh + bos + o_m, mask=m_m, other=float("inf"))
    b_lseg = tl.load(lse_gen + i_h * stride_lh + bos + o_m, mask=m_m, other=float("inf"))
    p_k = k + bos.to(tl.int64) * stride_kt + (i_h // GROUP) * stride_kh + o_d[None, :]
    p_mass = mass + i_h * stride_mh + i_t * stride_mt
    p_mass_gen = mass_gen + i_h * stride_mh + i_t * stride_mt

    # Prompt tiles (< g) are whole: no key mask. Sums run over BLOCK_N-key blocks of each tile.
    # The next block's Q K^T is issued before this block's exp2 and sums, so the tensor cores
    # work under the exponentials (measured 15-18% faster at 32k-64k, benchmarks/RESULTS.md).
    b_sum = tl.full([], 0.0, dtype=tl.float32)
    n_prompt = g * SUB_N
    if n_prompt > 0:
        b_s = tl.dot(b_q, tl.trans(tl.load(p_k + o_n[:, None] * stride_kt))) * qk_scale
        for i_it in range(1, n_prompt):
            b_k = tl.load(p_k + (i_it * BLOCK_N + o_n[:, None]) * stride_kt)
            b_sn = tl.dot(b_q, tl.trans(b_k))
            b_sum = _add_block_mass(b_s, b_lse, b_sum, p_mass, i_it - 1, inv_area, SUB_N)
            # Scaling here (not where it is used) waits for the dot at the end of this iteration;
            # carrying the raw dot result into the next one measured 1.4x slower.
            b_s = b_sn * qk_scale
        b_sum = _add_block_mass(b_s, b_lse, b_sum, p_mass, n_prompt - 1, inv_area, SUB_N)
    b_sumg = tl.full([], 0.0, dtype=tl.float32)
    n_blocks = tl.cdiv(seqlen, BLOCK_N)
    for i_it in range(g * SUB_N, n_blocks):
        m_n = i_it * BLOCK_N + o_n < seqlen
        b_k = tl.load(
            p_k + (i_it * BLOCK_N + o_n[:, None]) * stride_kt, mask=m_n[:, None], other=0.0
        )
        b_s = tl.where(m_n[None, :], tl.dot(b_q, tl.trans(b_k)) * qk_scale, float("-inf"))
        b_sum += tl.sum(tl.sum(tl.math.exp2(b_s - b_lse[:, None]), 1), 0)
        b_sumg += tl.sum(tl.sum(tl.math.exp2(b_s - b_lseg[:, None]), 1), 0)
        tile_done = (i_it % SUB_N == SUB_N - 1) | (i_it == n_blocks - 1)
        tl.store(p_mass + i_it // SUB_N, b_sum * inv_area, mask=tile_done)
        tl.store(p_mass_gen + i_it // SUB_N, b_sumg * inv_area, mask=tile_done)
        b_sum = tl.where(tile_done, 0.0, b_sum)
        b_sumg = tl.where(tile_done, 0.0, b_sumg)


def default_config(block_size: int) -> dict:
    """Launch choice of `_tile_mass_kernel` (measured, benchmarks/RESULTS.md)."""
    return {
        "BLOCK_N": min(128, block_size),
        "num_warps": 8 if block_size >= 128 else 4,
        "num_stages": 2,
    }


def fused_tile_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gen_lengths: Sequence[int],
    block_size: int = 128,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    config: dict | None = None,
):
    """Tile importance of a varlen batch, both rankings of SparseD's isolated selection.

    q `[T, Hq, D]`, k `[T, Hkv, D]`; `lse` (optional, fp32 `[Hq, T]`, natural log): the
    log-sum-exp of a dense attention over the same q, k *with the same scale*, which spares the
    full-key statistics pass. Returns `(mass, mass_gen, q_tile_offsets, gen_tiles)`: `mass`
    fp32 `[Hq, sum(nq), max(nb)]` (softmax over all keys; entries past a sequence's `nb` are
    unwritten), `mass_gen` the same for the softmax over generation keys (valid at tiles `>= g`).
    `config` overrides the tile-mass launch (`BLOCK_N`, `num_warps`, `num_stages`).
    """
    check_varlen_qkv(q, k, k, cu_seqlens)
    check_tile(block_size)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    seq_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    nbs = [num_tiles(n, block_size) for n in seq_lens]
    if len(gen_lengths) != len(seq_lens):
        raise ValueError(f"{len(gen_lengths)} gen_lengths for {len(seq_lens)} sequences")
    pairs = zip(seq_lens, gen_lengths, strict=True)
    gens = [generation_start_tile(n, gl, block_size) for n, gl in pairs]
    offsets = torch.tensor([0, *nbs], device=q.device).cumsum(0).to(torch.int32)
    gen_tiles = torch.tensor(gens, dtype=torch.int32, device=q.device)
    n_heads, n_tiles = q.shape[1], sum(nbs)
    tile_seq = tile_to_sequence(offsets, n_tiles)
    common = (tile_seq, offsets, cu_seqlens, gen_tiles)
    lse2 = _row_stats(q, k, common, scale, block_size, lse)
    mass = torch.empty(n_heads, n_tiles, max(nbs), dtype=torch.float32, device=q.device)
    mass_gen = torch.empty_like(mass)
    _tile_mass_kernel[(n_tiles, n_heads)](
        q,
        k,
        *lse2,
        mass,
        mass_gen,
        *common,
        scale * LOG2E,
        1.0 / block_size**2,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        lse2[0].stride(0),
        mass.stride(0),
        mass.stride(1),
        GROUP=n_heads // k.shape[1],
        D=q.shape[2],
        TILE=block_size,
        **{**default_config(block_size), **(config or {})},
    )
    return mass, mass_gen, offsets, gen_tiles


def _row_stats(q, k, common, scale, block_size, lse):
    """log2-sum-exp rows `[Hq, T]` over all keys and over generation keys (fp32)."""
    n_heads = q.shape[1]
    lse_gen = torch.empty(n_heads, q.shape[0], dtype=torch.float32, device=q.device)
    if lse is None:
        lse2 = torch.empty_like(lse_gen)
    else:
        if lse.shape != lse_gen.shape:
            raise ValueError(
                f"lse must be [Hq, T] = {tuple(lse_gen.shape)}, got {tuple(lse.shape)}"
            )
        lse2 = (lse.float() * LOG2E).contiguous()
    block_m = min(128, block_size)
    n_tiles = common[0].numel()
    _row_stats_kernel[(n_tiles * (block_size // block_m), n_heads)](
        q,
        k,
        lse2,
        lse_gen,
        *common,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        lse_gen.stride(0),
        GROUP=n_heads // k.shape[1],
        D=q.shape[2],
        TILE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=min(128, block_size),
        ALL_KEYS=lse is None,
        num_warps=8 if block_m >= 128 else 4,
        num_stages=2,
    )
    return lse2, lse_gen


def fused_select_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gen_lengths: Sequence[int],
    block_size: int = 128,
    select: float = 0.3,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    config: dict | None = None,
) -> PackedTilePattern:
    """SparseD selection for a varlen batch, as `core.pattern.select_pattern` per sequence.

    q `[T, Hq, D]` post-RoPE, k `[T, Hkv, D]`, cu_seqlens int32 `[B+1]`, one `gen_length` per
    sequence; `lse` and `config` as in `fused_tile_importance`. Returns a `PackedTilePattern`.
    """
    if not 0.0 <= select <= 1.0:
        raise ValueError(f"select must be in [0, 1], got {select}")
    mass, mass_gen, offsets, gen_tiles = fused_tile_importance(
        q, k, cu_seqlens, gen_lengths, block_size, scale, lse, config
    )
    seq_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    tile_bounds, gens = offsets.tolist(), gen_tiles.tolist()
    patterns = []
    for b, seq_len in enumerate(seq_lens):
        rows = slice(tile_bounds[b], tile_bounds[b + 1])
        nb, g = tile_bounds[b + 1] - tile_bounds[b], gens[b]
        keep = _isolated_topk(mass[:, rows, :nb], mass_gen[:, rows, g:nb], g, select)
        patterns.append(TilePattern.from_dense_mask(keep, block_size, seq_len))
    return pack_patterns(patterns)


def _isolated_topk(mass: torch.Tensor, mass_gen: torch.Tensor, g: int, select: float):
    """Pass 1 keeps its prompt tiles (< g), pass 2 adds generation tiles: bool `[Hq, nb, nb]`."""
    nb = mass.shape[-1]
    keep = torch.zeros_like(mass, dtype=torch.bool)
    if g > 0:
        keep[..., :g] = topk_tile_mask(mass, num_kept_tiles(nb, select))[..., :g]
    keep[..., g:] = topk_tile_mask(mass_gen, num_kept_tiles(nb - g, select))
    return keep
