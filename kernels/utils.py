"""Input checks and small index helpers shared by the kernel host wrappers."""

import functools
import os
import traceback
from collections.abc import Callable, Sequence

import torch

from sparsed_vllm.core.capabilities import TRITON_BACKEND

# What the Triton kernels run is stated once, in the capability table that request validation
# and the attention layer's dispatch read as well.
SUPPORTED_DTYPES = TRITON_BACKEND.dtypes
SUPPORTED_HEAD_DIMS = TRITON_BACKEND.head_dims
SUPPORTED_TILES = TRITON_BACKEND.tile_sizes
PAGE_SIZES = TRITON_BACKEND.kv_page_sizes
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


def import_traceback(load: Callable[[], object]) -> str | None:
    """Full traceback of `load()` failing (a vendor kernel's import), or None when it works."""
    try:
        load()
    except Exception:  # noqa: BLE001
        return traceback.format_exc()
    return None


def cuda_arch_in(archs: Sequence[int], device: torch.device | None = None) -> bool:
    """Whether a CUDA GPU (`device`, default the current one) of a compute-capability major in
    `archs` is there."""
    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return on_cuda and torch.cuda.get_device_capability(device)[0] in archs


def vendor_default(
    name: str, device: torch.device, archs: Sequence[int], available: Callable[[], bool]
) -> str:
    """The "auto" choice between a vendor kernel `name` and ours: `name` on a GPU of `archs`
    (where it measured faster) when it is `available()`, else "triton"."""
    return name if cuda_arch_in(archs, device) and available() else "triton"


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


def check_paged_inputs(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, out) -> None:
    """Validate the inputs of attention against a paged KV cache (`kernels/cached`): shapes,
    dtypes, strides and devices (no device data is read)."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "expected q [Tq, Hq, D], k/v_cache [num_pages, PAGE, Hkv, D]; got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    page_size, n_kv, head_dim = k_cache.shape[1:]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if q.shape[1] % n_kv:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {n_kv}")
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"dtypes must be one of fp16/bf16 and equal, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}"
        )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not supported (only {SUPPORTED_HEAD_DIMS})")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page size {page_size} not supported (only {PAGE_SIZES})")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        raise ValueError("the head_dim axis of q, k_cache and v_cache must be contiguous")
    n_seqs = cu_seqlens_q.shape[0] - 1
    for name, t, ndim in (("cu_seqlens_q", cu_seqlens_q, 1), ("kv_lens", kv_lens, 1)):
        if t.dtype != torch.int32 or t.dim() != ndim or t.stride(-1) != 1:
            raise ValueError(f"{name} must be a contiguous int32 vector, got {t.dtype} {t.shape}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.stride(1) != 1:
        raise ValueError(
            f"block_table must be int32 [B, max_pages], rows contiguous; got {block_table.dtype} "
            f"{tuple(block_table.shape)} strides {block_table.stride()}"
        )
    if kv_lens.shape[0] != n_seqs or block_table.shape[0] != n_seqs:
        raise ValueError(
            f"cu_seqlens_q [{n_seqs + 1}], kv_lens {tuple(kv_lens.shape)} and block_table "
            f"{tuple(block_table.shape)} describe different batch sizes"
        )
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, head_dim contiguous")
    tensors = (k_cache, v_cache, cu_seqlens_q, kv_lens, block_table) + (
        () if out is None else (out,)
    )
    if not on_kernel_device(q) or any(t.device != q.device for t in tensors):
        raise ValueError(
            "q, the caches, cu_seqlens_q, kv_lens and block_table must be on one CUDA device"
        )
