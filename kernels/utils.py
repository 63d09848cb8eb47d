"""Input checks and small index helpers shared by the kernel host wrappers."""

import functools
import os

import torch

from sparsed_vllm.core.capabilities import TRITON_BACKEND

# What the Triton kernels run is stated once, in the capability table that request validation
# and the attention layer's dispatch read as well.
SUPPORTED_DTYPES = TRITON_BACKEND.dtypes
SUPPORTED_HEAD_DIMS = TRITON_BACKEND.head_dims
SUPPORTED_TILES = TRITON_BACKEND.tile_sizes
# Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are defined) runs them on CPU
# tensors: how CI exercises the kernels without a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# SMs the launch plans assume when interpreted: an H100/H200's, so the plans are the GPU's.
INTERPRETED_SMS = 132


def on_kernel_device(t: torch.Tensor) -> bool:
    """Whether the Triton ops can take `t`: a CUDA tensor, or a CPU one when interpreted."""
    return t.is_cuda or (INTERPRETED and t.device.type == "cpu")


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of `t`'s GPU (the launch plans size their grids by it)."""
    if not t.is_cuda:
        return INTERPRETED_SMS
    return _num_sms_of(t.device.index if t.device.index is not None else 0)


@functools.cache
def _num_sms_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_varlen_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor):
    """Validate `q [T, Hq, D]`, `k/v [T, Hkv, D]`, `cu_seqlens int32 [B+1]` for the Triton ops."""
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3:
        raise ValueError(
            f"expected q [T, Hq, D], k/v [T, Hkv, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on T or D")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes must be one of fp16/bf16 and equal, got {q.dtype}, {k.dtype}")
    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[2]} not supported (only {SUPPORTED_HEAD_DIMS})")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("the head_dim axis of q, k and v must be contiguous")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(
            f"cu_seqlens must be int32 [B+1], got {cu_seqlens.dtype} {cu_seqlens.shape}"
        )
    if not (on_kernel_device(q) and k.device == q.device and cu_seqlens.device == q.device):
        raise ValueError("q, k, v and cu_seqlens must be on one CUDA device")


def check_tile(block_size: int) -> None:
    if block_size not in SUPPORTED_TILES:
        raise ValueError(f"block_size {block_size} not supported (only {SUPPORTED_TILES})")


def tile_to_sequence(q_tile_offsets: torch.Tensor, total_tiles: int) -> torch.Tensor:
    """int32 `[total_tiles]`: the sequence of each packed query tile (no host sync)."""
    counts = q_tile_offsets[1:] - q_tile_offsets[:-1]
    seq_ids = torch.arange(counts.numel(), device=q_tile_offsets.device, dtype=torch.int32)
    return torch.repeat_interleave(seq_ids, counts, output_size=total_tiles).to(torch.int32)
