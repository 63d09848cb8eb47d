"""Dense varlen attention for the dense denoising steps, on the fastest kernel available.

Backends, fastest first on H100 (benchmarks/RESULTS.md): cuDNN's fused attention through PyTorch
(`cudnn`, one call per sequence), FlashAttention-2 varlen as bundled with PyTorch (`flash`), and a
plain SDPA fallback (`math`, also the CPU path). All return the softmax LSE on request, which the
fused selection reuses at the switch step instead of recomputing it.
"""

import functools
import itertools

import torch

PREFERENCE = ("cudnn", "flash", "math")


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    backend: str | None = None,
    return_lse: bool = False,
):
    """Bidirectional attention of a varlen batch.

    q `[T, Hq, D]`, k/v `[T, Hkv, D]`, cu_seqlens int32 `[B+1]`. Returns `[T, Hq, D]`, and with
    `return_lse` also the fp32 natural-log LSE `[Hq, T]`. `backend=None` picks the first working
    entry of `PREFERENCE` for q's device and dtype.
    """
    if q.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"expected q [T, Hq, D], k/v [T, Hkv, D]; got {q.shape}, {k.shape}")
    backend = backend or dense_backends(q.device.type, q.dtype, q.shape[-1])[0]
    if backend not in _BACKENDS:
        raise ValueError(f"unknown dense backend {backend!r}; choose from {PREFERENCE}")
    out, lse = _BACKENDS[backend](q, k, v, cu_seqlens, max_seqlen, scale, return_lse)
    return (out, lse) if return_lse else out


@functools.cache
def dense_backends(device_type: str = "cuda", dtype=torch.bfloat16, head_dim: int = 128):
    """The backends that run here for this dtype and head_dim, in preference order."""
    if device_type != "cuda":
        return ("math",)
    return tuple(name for name in PREFERENCE if _works(name, dtype, head_dim))


def _works(name, dtype, head_dim) -> bool:
    q = torch.randn(70, 4, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(70, 2, head_dim, device="cuda", dtype=dtype)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32, device="cuda")
    try:
        out, lse = _BACKENDS[name](q, k, k, cu, 40, 0.1, True)
        want, want_lse = _math(q, k, k, cu, 40, 0.1, True)
    except RuntimeError:
        return False
    return bool(torch.allclose(out.float(), want.float(), atol=2e-2)) and bool(
        torch.allclose(lse, want_lse, atol=1e-2)
    )


def _per_sequence(attend):
    """Run a batched `[1, H, L, D]` kernel sequence by sequence and gather `[T, H, D]`, `[H, T]`."""

    def run(q, k, v, cu_seqlens, max_seqlen, scale, return_lse):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        bounds = cu_seqlens.tolist()
        for s, e in itertools.pairwise(bounds):
            qb, kb, vb = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            ob, lb = attend(qb, kb, vb, scale, return_lse)
            out[s:e] = ob[0].transpose(0, 1)
            if return_lse:
                lse[:, s:e] = lb.reshape(q.shape[1], e - s)
        return out, lse if return_lse else None

    return run


def _expand_kv(q, k, v):
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


@_per_sequence
def _cudnn(q, k, v, scale, return_lse):
    # cuDNN through PyTorch takes equal head counts only, hence the GQA expansion.
    if k.shape[1] != q.shape[1]:
        k, v = _expand_kv(q, k, v)
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, return_lse, 0.0, False, False, scale=scale
    )
    return out, lse


def _flash(q, k, v, cu_seqlens, max_seqlen, scale, return_lse):
    # FlashAttention-2 varlen handles GQA and the packed layout natively.
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False, scale=scale
    )
    if not return_lse:
        return out, None
    if lse.dim() == 3:  # older layout: [B, H, max_seqlen]
        bounds = cu_seqlens.tolist()
        lse = torch.cat(
            [lse[b, :, : e - s] for b, (s, e) in enumerate(itertools.pairwise(bounds))], 1
        )
    return out, lse.float()


def _math(q, k, v, cu_seqlens, max_seqlen, scale, return_lse):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for s, e in itertools.pairwise(bounds):
        qb = q[s:e].transpose(0, 1).float()
        kb, vb = (t[s:e].transpose(0, 1).float() for t in _expand_kv(q, k, v))
        scores = qb @ kb.transpose(1, 2) * scale
        out[s:e] = (scores.softmax(-1) @ vb).transpose(0, 1).to(q.dtype)
        lse[:, s:e] = scores.logsumexp(-1)
    return out, lse if return_lse else None


_BACKENDS = {"cudnn": _cudnn, "flash": _flash, "math": _math}
