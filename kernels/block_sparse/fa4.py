"""SparseD tile patterns on FlashAttention-4's block-sparse forward (CuTe DSL, as vLLM 0.32 ships
it in `vllm.vllm_flash_attn.cute`): an adapter, for comparison with `fused.py` (issue 17).

FA4 takes, per (batch, query head, query m-block), two lists of key n-blocks: "mask" blocks, which
evaluate a `mask_mod`, and "full" blocks, which do not (`BlockSparseTensorsTorch` in
`block_sparsity.py`: `*_block_cnt [B, H, M]`, `*_block_idx [B, H, M, N']` int32 on CUDA, only the
first `cnt` entries read, `N' <= ceil(L / tile_n)`).

Mapping from a `TilePattern` (tile = `block_size`, kept key tiles ascending):
- every kept key tile is a full block; the mask lists are empty (counts 0, width 1);
- key side: FA4's n-block is `tile_n = 128` for head_dim <= 128 (`_tile_size_fwd_sm90` and the
  SM100 default in `interface.py`), and SM90 refuses coarser sparse KV blocks, so tile `j` becomes
  n-blocks `j * f .. j * f + f - 1` with `f = block_size / 128`, dropping those wholly past the
  sequence (the last tile of a tile-256 pattern can end there);
- query side: `block_size = (tile, 128)` tells FA4 our query tile; it must be a multiple of
  `q_stage * tile_m` (`infer_block_sparse_expected_shapes`), then each m-block of a tile reads the
  tile's list (`q_subtile_factor`). SM90: `tile_m = 128`, `q_stage = 1`, so tiles 128, 256, ...;
  SM100: `q_stage = 2` past one m-block, so tiles 256, 512, ... A smaller tile has no exact
  mapping (the union of several query tiles' lists would change their softmax): ValueError, and
  the caller falls back to `fused.py`.
- the partial last key tile needs no mask entry: both lists are walked from their last (highest)
  entry down, and the first block walked in each list is masked by `seqlen_k` (`mask_seqlen=True`
  in `consume_block_sparse_loads` of `block_sparse_utils.py` on SM90,
  `softmax_block_sparse_sm100_list` on SM100). Ascending indices put the partial tile there.
- GQA: the lists are per query head, so `pack_gqa=False` (FA4 packs only with a head-broadcast
  pattern); K/V head `h // (Hq / Hkv)` is native.
- LSE: natural log, `[B, H, L]` (`[H, T]` varlen), as `dense_attention` returns it.
- varlen: FA4 accepts 2-D `[H, total_m_blocks]` / `[H, total_idx]` lists with `cu_total_m_blocks`
  and `cu_block_idx_offsets` (m-block `m` of sequence `b` reads its list at
  `cu_block_idx_offsets[b] + m * ceil(L_b / 128)`; `_get_curr_blocksparse_tensors_varlen`), query
  block exactly `q_stage * tile_m` (tile 128 on SM90). `fa4_sparse_attention` does not rely on
  it: it calls FA4 once per sequence; `fa4_sparse_attention_varlen` is the one-call probe.
"""

import functools
import math
from dataclasses import dataclass

import torch

from sparsed_vllm.core.pattern import PackedTilePattern, TilePattern

from ..utils import check_varlen_qkv, cuda_arch_in, import_traceback, vendor_default

FA4_N_BLOCK = 128
FA4_HEAD_DIMS = (64, 128)


def fa4_block_sparse_tensors(
    kv_indices: torch.Tensor, kv_counts: torch.Tensor, block_size: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """FA4 lists of one sequence (or a batch of equal-length ones), every kept tile a full block.

    kv_indices `[Hq, nq, K]` (or `[B, Hq, nq, K]`) int32 ascending, -1 padded; kv_counts
    `[Hq, nq]` (or `[B, Hq, nq]`). Returns int32 `full_block_cnt [B, Hq, nq]`,
    `full_block_idx [B, Hq, nq, K']` (128-key n-blocks, `K' = min(K * f, ceil(L / 128))`),
    `mask_block_cnt` zeros like the counts and `mask_block_idx` zeros `[B, Hq, nq, 1]`.
    """
    check_fa4_tile(block_size)
    if kv_indices.dim() == 3:
        kv_indices, kv_counts = kv_indices[None], kv_counts[None]
    f = block_size // FA4_N_BLOCK
    n_blocks = math.ceil(seq_len / FA4_N_BLOCK)
    sub = torch.arange(f, device=kv_indices.device)
    blocks = (kv_indices.long()[..., None] * f + sub).flatten(-2)  # [B, Hq, nq, K * f]
    slots = torch.arange(blocks.shape[-1], device=blocks.device)
    valid = (slots < kv_counts[..., None].long() * f) & (blocks < n_blocks)
    # Valid entries stay a prefix: only the last kept tile can have n-blocks past the end.
    width = min(blocks.shape[-1], n_blocks)
    full_idx = torch.where(valid, blocks, 0)[..., :width].to(torch.int32).contiguous()
    full_cnt = valid.sum(-1, dtype=torch.int32)
    return {
        "mask_block_cnt": torch.zeros_like(full_cnt),
        "mask_block_idx": torch.zeros(*full_cnt.shape, 1, dtype=torch.int32, device=blocks.device),
        "full_block_cnt": full_cnt,
        "full_block_idx": full_idx,
    }


def fa4_varlen_block_sparse_tensors(pattern: PackedTilePattern) -> dict[str, torch.Tensor]:
    """FA4's 2-D varlen lists of a whole batch (tile 128 only: FA4's varlen query block).

    Returns int32 `full_block_cnt [Hq, sum(nq)]` (= kv_counts), `full_block_idx [Hq, sum(nq^2)]`
    (sequence `b`, tile `m` at `cu_block_idx_offsets[b] + m * nq_b`), zero mask lists of the same
    shapes, `cu_total_m_blocks [B+1]` (= q_tile_offsets) and `cu_block_idx_offsets [B+1]`.
    """
    if pattern.block_size != FA4_N_BLOCK:
        raise ValueError(f"FA4 varlen block sparsity needs tile 128, got {pattern.block_size}")
    n_heads, _, width = pattern.kv_indices.shape
    nqs = [math.ceil(n / FA4_N_BLOCK) for n in pattern.seq_lens]
    device = pattern.kv_indices.device
    rows, q_off = [], 0
    for nq in nqs:
        seq = torch.zeros(n_heads, nq, nq, dtype=torch.int32, device=device)
        w = min(width, nq)
        seq[..., :w] = pattern.kv_indices[:, q_off : q_off + nq, :w].clamp_min(0)
        rows.append(seq.flatten(1))
        q_off += nq
    full_idx = torch.cat(rows, dim=1).contiguous()
    offsets = torch.tensor([0] + [n * n for n in nqs], device=device).cumsum(0)
    full_cnt = pattern.kv_counts.to(torch.int32).contiguous()
    return {
        "mask_block_cnt": torch.zeros_like(full_cnt),
        "mask_block_idx": torch.zeros_like(full_idx),
        "full_block_cnt": full_cnt,
        "full_block_idx": full_idx,
        "cu_total_m_blocks": pattern.q_tile_offsets.to(torch.int32).contiguous(),
        "cu_block_idx_offsets": offsets.to(torch.int32),
    }


def check_fa4_tile(block_size: int, head_dim: int = 128, arch_major: int = 9) -> None:
    """ValueError unless FA4 can run this tile exactly (see the module docstring)."""
    if head_dim not in FA4_HEAD_DIMS:
        raise ValueError(f"FA4 block sparsity: head_dim {head_dim} not in {FA4_HEAD_DIMS}")
    q_block = FA4_N_BLOCK * (2 if arch_major in (10, 11) else 1)
    if block_size <= 0 or block_size % q_block:
        raise ValueError(
            f"FA4 block sparsity on sm{arch_major}x needs a tile that is a multiple of {q_block} "
            f"(its query block), got {block_size}: use the Triton sparse_attention"
        )


@functools.cache
def _fa4():
    """The FA4 interface module and `BlockSparseTensorsTorch` (imported on first use)."""
    import vllm.vllm_flash_attn.cute.interface as interface
    from vllm.vllm_flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return interface, BlockSparseTensorsTorch


@functools.cache
def fa4_import_error() -> str | None:
    """Full traceback of the failed FA4 import, or None when it imports."""
    return import_traceback(_fa4)


@functools.cache
def fa4_available() -> bool:
    """FA4 imports and a Hopper or Blackwell (sm90/sm100/sm110) GPU is visible."""
    return cuda_arch_in((9, 10, 11)) and fa4_import_error() is None


# Compute-capability majors where FA4's block-sparse forward measured faster than our Triton
# kernel (benchmarks/RESULTS.md, "FlashAttention-4 block-sparse": 1.31-1.41x on an H200) and
# ran inside the engine: there it is the default (`runner.sparse_kernel: "auto"`). Blackwell
# runs it when asked ("fa4") but has not been measured.
FA4_DEFAULT_ARCHS = (9,)


def default_sparse_kernel(device: torch.device) -> str:
    """The sparse-step kernel of `runner.sparse_kernel: "auto"` on `device`: "fa4" where it
    measured faster and imports, else "triton" (which also covers what FA4 cannot run)."""
    return vendor_default("fa4", device, FA4_DEFAULT_ARCHS, fa4_available)


def _arch_major(device: torch.device) -> int:
    # CPU tensors only reach here in the tests, which stand in a PyTorch model of FA4 (as SM90).
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9


def fa4_runs(block_size: int, head_dim: int, device: torch.device) -> bool:
    """Whether FA4 is available on `device` and runs this tile and head size exactly."""
    if device.type != "cuda" or not fa4_available():
        return False
    try:
        check_fa4_tile(block_size, head_dim, _arch_major(device))
    except ValueError:
        return False
    return True


def prepare_fa4_sequence(pattern: TilePattern):
    """FA4's lists (`BlockSparseTensorsTorch`) of one sequence's pattern; no host sync."""
    _, block_sparse_tensors = _fa4()
    lists = fa4_block_sparse_tensors(
        pattern.kv_indices, pattern.kv_counts, pattern.block_size, pattern.seq_len
    )
    return block_sparse_tensors(**lists, block_size=(pattern.block_size, FA4_N_BLOCK))


@dataclass
class FA4Pattern:
    """A `PackedTilePattern` converted once: per sequence, its token bounds and FA4 lists."""

    bounds: list[tuple[int, int]]
    tensors: list[object]  # BlockSparseTensorsTorch per sequence
    block_size: int


def fa4_batch_pattern(sequences: list, seq_lens: list[int], block_size: int) -> FA4Pattern:
    """An `FA4Pattern` from `prepare_fa4_sequence` results of sequences laid end to end."""
    starts = [sum(seq_lens[:i]) for i in range(len(seq_lens))]
    bounds = [(s, s + n) for s, n in zip(starts, seq_lens, strict=True)]
    return FA4Pattern(bounds, list(sequences), block_size)


def prepare_fa4_pattern(pattern: PackedTilePattern) -> FA4Pattern:
    """Convert once (a pattern serves every step after the switch); host data only, no sync."""
    check_fa4_tile(pattern.block_size, arch_major=_arch_major(pattern.kv_indices.device))
    sequences, q0 = [], 0
    for seq_len in pattern.seq_lens:
        nq = math.ceil(seq_len / pattern.block_size)
        rows = slice(q0, q0 + nq)
        sequence = TilePattern(
            pattern.kv_indices[:, rows], pattern.kv_counts[:, rows], pattern.block_size, seq_len
        )
        sequences.append(prepare_fa4_sequence(sequence))
        q0 += nq
    return fa4_batch_pattern(sequences, pattern.seq_lens, pattern.block_size)


def fa4_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pattern: PackedTilePattern | FA4Pattern,
    scale: float,
    return_lse: bool = False,
):
    """Block-sparse attention through FA4, one call per sequence (`[1, L, H, D]` views).

    q `[T, Hq, D]`, k/v `[T, Hkv, D]` bf16/fp16, D in {64, 128}; pattern: the batch's
    `PackedTilePattern` (tile a multiple of FA4's query block) or its `prepare_fa4_pattern`.
    Returns out `[T, Hq, D]`, and with `return_lse` also the natural-log LSE `[Hq, T]` fp32.
    """
    check_varlen_qkv(q, k, v, cu_seqlens)
    check_fa4_tile(pattern.block_size, q.shape[2], arch_major=_arch_major(q.device))
    if isinstance(pattern, PackedTilePattern):
        pattern = prepare_fa4_pattern(pattern)
    if pattern.bounds[-1][1] != q.shape[0] or len(pattern.bounds) != cu_seqlens.numel() - 1:
        raise ValueError(f"pattern covers {pattern.bounds[-1][1]} tokens, q has {q.shape[0]}")
    interface, _ = _fa4()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device) if return_lse else None
    for (s, e), tensors in zip(pattern.bounds, pattern.tensors, strict=True):
        o_b, lse_b = interface.flash_attn_func(
            q[None, s:e],
            k[None, s:e],
            v[None, s:e],
            softmax_scale=scale,
            causal=False,
            pack_gqa=False,
            block_sparse_tensors=tensors,
            return_lse=return_lse,
            out=out[None, s:e],
        )
        if o_b.data_ptr() != out[s:e].data_ptr():
            out[s:e] = o_b[0]
        if return_lse:
            lse[:, s:e] = lse_b[0]
    return (out, lse) if return_lse else out


def fa4_sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pattern: PackedTilePattern,
    scale: float,
    return_lse: bool = False,
):
    """One FA4 varlen call with 2-D block-sparse lists (tile 128, SM90): the probe of that mode.

    Same arguments and results as `fa4_sparse_attention`.
    """
    check_varlen_qkv(q, k, v, cu_seqlens)
    interface, block_sparse_tensors = _fa4()
    lists = fa4_varlen_block_sparse_tensors(pattern)
    tensors = block_sparse_tensors(**lists, block_size=(FA4_N_BLOCK, FA4_N_BLOCK))
    max_len = max(pattern.seq_lens)
    out, lse = interface.flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_k=max_len,
        softmax_scale=scale,
        causal=False,
        pack_gqa=False,
        block_sparse_tensors=tensors,
        return_lse=return_lse,
    )
    return (out, lse) if return_lse else out
