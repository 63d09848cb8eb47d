"""Triton block-sparse attention (forward) over the compact SparseD tile pattern.

One program handles `BLOCK_M` query rows of one query tile and one query head, and walks only the
key tiles listed for that (head, tile) in `kv_indices`, `BLOCK_N` keys at a time, with the usual
online softmax (exp2, scale folded into log2(e)). Indices ascend, so the one partial key tile of a
sequence (its last) can only be the last kept entry: every other tile runs without masks.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from sparsed_vllm.core.pattern import PackedTilePattern

from ..utils import check_tile, check_varlen_qkv, tile_to_sequence

LOG2E = math.log2(math.e)


@triton.jit
def _attend_block(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, m_n, MASKED: tl.constexpr):
    """One online-softmax update with a `[BLOCK_N, D]` key/value block."""
    b_s = tl.dot(b_q, tl.trans(b_k))
    if MASKED:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
    b_p = tl.math.exp2(b_s * qk_scale - b_mn[:, None])
    b_alpha = tl.math.exp2(b_m - b_mn)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None])
    return b_mn, b_l, b_acc


@triton.jit
def _query_block(tile_seq, q_tile_offsets, cu_seqlens, TILE: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's packed query tile, its sequence's start and length, and its first row."""
    i_m = tl.program_id(0)
    i_t = i_m // (TILE // BLOCK_M)
    i_b = tl.load(tile_seq + i_t)
    bos = tl.load(cu_seqlens + i_b)
    seqlen = tl.load(cu_seqlens + i_b + 1) - bos
    q_begin = (i_t - tl.load(q_tile_offsets + i_b)) * TILE + (i_m % (TILE // BLOCK_M)) * BLOCK_M
    return i_t, bos, seqlen, q_begin


@triton.jit
def _kept_tiles(p_idx, p_count, seqlen, TILE: tl.constexpr):
    """Unmasked tile count, and whether the last kept tile is the sequence's partial one."""
    n_kept = tl.load(p_count)
    last_kept = tl.load(p_idx + tl.maximum(n_kept - 1, 0))
    has_partial = (n_kept > 0) & (seqlen % TILE != 0) & (last_kept == (seqlen - 1) // TILE)
    return n_kept - has_partial.to(tl.int32), has_partial, last_kept


@triton.jit
def _sparse_attn_fwd_kernel(
    q,
    k,
    v,
    o,
    kv_indices,
    kv_counts,
    tile_seq,
    q_tile_offsets,
    cu_seqlens,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_ih,
    stride_it,
    stride_ch,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_h = tl.program_id(1)
    SUB_N: tl.constexpr = TILE // BLOCK_N
    i_t, bos, seqlen, q_begin = _query_block(tile_seq, q_tile_offsets, cu_seqlens, TILE, BLOCK_M)
    if q_begin >= seqlen:
        return
    o_m = q_begin + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D)
    m_m = o_m < seqlen
    p_q = q + bos.to(tl.int64) * stride_qt + o_m[:, None] * stride_qt + i_h * stride_qh + o_d
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    p_k = k + bos.to(tl.int64) * stride_kt + (i_h // GROUP) * stride_kh + o_d[None, :]
    p_v = v + bos.to(tl.int64) * stride_vt + (i_h // GROUP) * stride_vh + o_d[None, :]
    p_idx = kv_indices + i_h * stride_ih + i_t * stride_it
    n_full, has_partial, last_kept = _kept_tiles(
        p_idx, kv_counts + i_h * stride_ch + i_t, seqlen, TILE
    )

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for i_it in range(n_full * SUB_N):
        o_kv = tl.load(p_idx + i_it // SUB_N) * TILE + (i_it % SUB_N) * BLOCK_N + o_n
        b_k = tl.load(p_k + o_kv[:, None] * stride_kt)
        b_v = tl.load(p_v + o_kv[:, None] * stride_vt)
        b_m, b_l, b_acc = _attend_block(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, o_n, False)
    if has_partial:
        for i_sub in range(tl.cdiv(seqlen - last_kept * TILE, BLOCK_N)):
            o_kv = last_kept * TILE + i_sub * BLOCK_N + o_n
            m_n = o_kv < seqlen
            b_k = tl.load(p_k + o_kv[:, None] * stride_kt, mask=m_n[:, None], other=0.0)
            b_v = tl.load(p_v + o_kv[:, None] * stride_vt, mask=m_n[:, None], other=0.0)
            b_m, b_l, b_acc = _attend_block(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, m_n, True)
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    p_o = o + bos.to(tl.int64) * stride_ot + o_m[:, None] * stride_ot + i_h * stride_oh + o_d
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])


@triton.jit
def _sparse_attn_fwd_tma_kernel(
    desc_q,
    desc_k,
    desc_v,
    o,
    kv_indices,
    kv_counts,
    tile_seq,
    q_tile_offsets,
    cu_seqlens,
    qk_scale,
    stride_ot,
    stride_oh,
    stride_ih,
    stride_it,
    stride_ch,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """As `_sparse_attn_fwd_kernel`, loading tiles with the Hopper tensor-memory accelerator.

    Descriptors view q/k/v as `[T, H * D]`; rows past a sequence read the next one (or zeros past
    T), which the key mask and the row-masked store make harmless.
    """
    i_h = tl.program_id(1)
    SUB_N: tl.constexpr = TILE // BLOCK_N
    i_t, bos, seqlen, q_begin = _query_block(tile_seq, q_tile_offsets, cu_seqlens, TILE, BLOCK_M)
    if q_begin >= seqlen:
        return
    o_m = q_begin + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    col_kv = (i_h // GROUP) * D
    b_q = desc_q.load([bos + q_begin, i_h * D])
    p_idx = kv_indices + i_h * stride_ih + i_t * stride_it
    n_full, has_partial, last_kept = _kept_tiles(
        p_idx, kv_counts + i_h * stride_ch + i_t, seqlen, TILE
    )

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for i_it in tl.range(n_full * SUB_N, warp_specialize=WARP_SPEC):
        i_kv = bos + tl.load(p_idx + i_it // SUB_N) * TILE + (i_it % SUB_N) * BLOCK_N
        b_k = desc_k.load([i_kv, col_kv])
        b_v = desc_v.load([i_kv, col_kv])
        b_m, b_l, b_acc = _attend_block(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, o_n, False)
    if has_partial:
        for i_sub in range(tl.cdiv(seqlen - last_kept * TILE, BLOCK_N)):
            i_kv = last_kept * TILE + i_sub * BLOCK_N
            b_k = desc_k.load([bos + i_kv, col_kv])
            b_v = desc_v.load([bos + i_kv, col_kv])
            m_n = i_kv + o_n < seqlen
            b_m, b_l, b_acc = _attend_block(b_q, b_k, b_v, b_m, b_l, b_acc, qk_scale, m_n, True)
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    o_d = tl.arange(0, D)
    p_o = o + bos.to(tl.int64) * stride_ot + o_m[:, None] * stride_ot + i_h * stride_oh + o_d
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=(o_m < seqlen)[:, None])


def default_config(head_dim: int, block_size: int) -> dict:
    """Launch choice measured on H100/H200 (benchmarks/RESULTS.md), capped by the tile size."""
    block = min(128, block_size)
    return {
        "BLOCK_M": block,
        "BLOCK_N": block,
        "num_warps": 8 if block >= 128 else 4,
        "num_stages": 3,
        "USE_TMA": False,  # measured within noise of the pointer loads (RESULTS.md)
        "WARP_SPEC": False,
    }


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pattern: PackedTilePattern,
    scale: float,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Block-sparse attention of a varlen batch; softmax over the kept key tiles only.

    q `[T, Hq, D]`, k/v `[T, Hkv, D]` (fp16/bf16, D in {64, 128}), cu_seqlens int32 `[B+1]`,
    pattern: the batch's `PackedTilePattern` (tile = `pattern.block_size`). Returns `[T, Hq, D]`.
    `config` overrides the launch choice (`BLOCK_M`, `BLOCK_N`, `num_warps`, `num_stages`,
    `USE_TMA`: tensor-descriptor loads, Hopper+ (None: when the GPU has them), `WARP_SPEC`:
    warp-specialised loop, with TMA only).
    """
    check_varlen_qkv(q, k, v, cu_seqlens)
    check_tile(pattern.block_size)
    _check_pattern(pattern, q.shape[1], cu_seqlens)
    out = torch.empty_like(q) if out is None else out
    cfg = {**default_config(q.shape[2], pattern.block_size), **(config or {})}
    use_tma, warp_spec = cfg.pop("USE_TMA"), cfg.pop("WARP_SPEC")
    use_tma = q.is_cuda and _has_tma(q.device.index) if use_tma is None else use_tma
    n_tiles = pattern.kv_counts.shape[1]
    tile_seq = tile_to_sequence(pattern.q_tile_offsets, n_tiles)
    grid = (n_tiles * (pattern.block_size // cfg["BLOCK_M"]), q.shape[1])
    common = (
        pattern.kv_indices,
        pattern.kv_counts,
        tile_seq,
        pattern.q_tile_offsets,
        cu_seqlens,
        scale * LOG2E,
    )
    strides = (
        out.stride(0),
        out.stride(1),
        pattern.kv_indices.stride(0),
        pattern.kv_indices.stride(1),
        pattern.kv_counts.stride(0),
    )
    meta = {"GROUP": q.shape[1] // k.shape[1], "D": q.shape[2], "TILE": pattern.block_size, **cfg}
    if use_tma and all(t.stride(1) == t.shape[2] for t in (q, k, v)):
        descs = (
            _descriptor(q, cfg["BLOCK_M"]),
            _descriptor(k, cfg["BLOCK_N"]),
            _descriptor(v, cfg["BLOCK_N"]),
        )
        _sparse_attn_fwd_tma_kernel[grid](
            *descs, out, *common, *strides, WARP_SPEC=warp_spec, **meta
        )
        return out
    _sparse_attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        *common,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *strides,
        **meta,
    )
    return out


@functools.cache
def _has_tma(device_index) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _descriptor(t: torch.Tensor, rows: int):
    """Tensor descriptor over `[T, H, D]` seen as `[T, H * D]`, loading `[rows, D]` blocks."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n_tokens, n_heads, head_dim = t.shape
    return TensorDescriptor(t, [n_tokens, n_heads * head_dim], [t.stride(0), 1], [rows, head_dim])


def _check_pattern(pattern: PackedTilePattern, n_heads: int, cu_seqlens: torch.Tensor) -> None:
    idx, counts = pattern.kv_indices, pattern.kv_counts
    if idx.dtype != torch.int32 or counts.dtype != torch.int32:
        raise ValueError("kv_indices and kv_counts must be int32")
    if idx.shape[:2] != counts.shape or idx.shape[0] != n_heads:
        raise ValueError(f"pattern {tuple(idx.shape)}/{tuple(counts.shape)} vs {n_heads} heads")
    if idx.stride(-1) != 1 or counts.stride(-1) != 1:
        raise ValueError("kv_indices and kv_counts must be contiguous in their last axis")
    if pattern.q_tile_offsets.numel() != cu_seqlens.numel():
        raise ValueError("pattern and cu_seqlens describe different batch sizes")
    if idx.device != cu_seqlens.device or counts.device != cu_seqlens.device:
        raise ValueError("the pattern must live on the same device as q")
