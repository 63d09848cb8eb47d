"""Dense cached steps on vLLM's FlashAttention-3 build (`vllm.vllm_flash_attn`, `fa_version=3`).

A cached step's dense window is plain attention of a few query rows to all of their sequence's
keys in the paged cache: FA3's varlen forward with `block_table` and `seqused_k`, non-causal, is
exactly that, and vLLM 0.32 ships it (`_vllm_fa3_C`, Hopper only) in every CUDA install. It
measured 1.75-1.96x faster than `fused.cached_attention` for LLaDA and 1.7-3.3x for Dream at
16k-64k keys on an H200 (benchmarks/RESULTS.md, "Cached steps: vLLM's FlashAttention-3"), so it
is the default there (`runner.cached_kernel: "auto"`). The cached *sparse* steps stay on
`sparse.cached_sparse_attention`: FA3 has no block sparsity.

Layouts are the engine's own: q `[Tq, Hq, D]`, k/v_cache `[num_pages, PAGE, Hkv, D]` (the two
halves of one `[2, ...]` cache), kv_lens and block_table int32. FA3 takes the split count from its
own heuristic (`num_splits=0`), which measured as good as ours or better at every shape.
"""

import functools

import torch

from ..utils import check_paged_inputs, cuda_arch_in, import_traceback, vendor_default

# Compute-capability majors where FA3 measured faster than `cached_attention` and ran inside the
# engine: there "auto" picks it. FA3 itself runs only on these (sm_90).
FA3_DEFAULT_ARCHS = (9,)
FA3_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _fa3():
    """vLLM's `flash_attn_interface` (imported on first use); ImportError when its FA3 build is
    missing (`FA3_AVAILABLE` false, with vLLM's reason)."""
    from vllm.vllm_flash_attn import flash_attn_interface as interface

    if not interface.FA3_AVAILABLE:
        raise ImportError(f"vLLM's FA3 build is missing: {interface.FA3_UNAVAILABLE_REASON}")
    return interface


@functools.cache
def fa3_import_error() -> str | None:
    """Full traceback of the failed FA3 import, or None when it imports."""
    return import_traceback(_fa3)


@functools.cache
def fa3_available() -> bool:
    """FA3 imports and a GPU of `FA3_DEFAULT_ARCHS` (Hopper) is visible."""
    return cuda_arch_in(FA3_DEFAULT_ARCHS) and fa3_import_error() is None


def default_cached_kernel(device: torch.device) -> str:
    """The dense cached-step kernel of `runner.cached_kernel: "auto"` on `device`: "fa3" where it
    measured faster and imports, else "triton"."""
    return vendor_default("fa3", device, FA3_DEFAULT_ARCHS, fa3_available)


def fa3_runs(q: torch.Tensor) -> bool:
    """Whether FA3 runs these queries: a Hopper GPU with FA3 installed, fp16/bf16 (the head sizes
    the engine's kernels run, 64 and 128, are within FA3's)."""
    return q.device.type == "cuda" and q.dtype in FA3_DTYPES and fa3_available()


def fa3_cached_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_kv_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fused.cached_attention`'s contract on FA3: each sequence's query rows attend to all of
    its `kv_lens[b]` keys in the paged cache. `max_seqlen_q` and `max_kv_len` are host ints, upper
    bounds of any sequence's query rows and keys (FA3 sizes its grid and splits from them)."""
    check_paged_inputs(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, out)
    if q.shape[0] == 0 or kv_lens.shape[0] == 0:
        return torch.empty_like(q) if out is None else out
    return _fa3().flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        max_seqlen_q=max_seqlen_q,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_k=max_kv_len,
        seqused_k=kv_lens,
        softmax_scale=scale,
        causal=False,
        block_table=block_table,
        out=out,
        fa_version=3,
    )
