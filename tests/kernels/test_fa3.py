"""vLLM's FlashAttention-3 on the dense cached steps: the adapter and the executor's dispatch
against a PyTorch model of FA3's paged contract (CPU), and the kernel against the reference
(GPU, skipped where vLLM's FA3 build does not import or the GPU is not a Hopper)."""

import math

import pytest
import torch
from sparsed_vllm.kernels import cached_attention_ref
from sparsed_vllm.kernels.cached import fa3
from test_cached_attention import GPU_CASES, _case_id, make_paged

from sparsed_vllm.core.sparsed import DENSE, PatternStore
from sparsed_vllm.core.staged import AttentionBatch, CachedWindow, SequenceStage, staged_attention


class FakeFA3:
    """`flash_attn_varlen_func(..., fa_version=3)` with a paged cache, as its docstring states it,
    in PyTorch: rows of sequence b (`cu_seqlens_q`) attend to its first `seqused_k[b]` keys, key p
    at row `p % PAGE` of page `block_table[b, p // PAGE]`; non-causal here. Records its calls."""

    calls: list[dict] = []

    @classmethod
    def flash_attn_varlen_func(cls, q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, **kw):
        assert kw["fa_version"] == 3 and kw["causal"] is False
        table, used, page = kw["block_table"], kw["seqused_k"], k.shape[1]
        bounds = cu_seqlens_q.tolist()
        out = kw["out"] if kw["out"] is not None else torch.zeros_like(q)
        for b, n in enumerate(used.tolist()):
            s, e = bounds[b], bounds[b + 1]
            # The host bounds must hold for every sequence (FA3 sizes its grid from them).
            assert e - s <= max_seqlen_q and n <= max_seqlen_k
            pages = table[b, : math.ceil(n / page)].long()
            keys, values = (c[pages].flatten(0, 1)[:n].float() for c in (k, v))
            group = q.shape[1] // k.shape[2]
            keys, values = (t.repeat_interleave(group, 1) for t in (keys, values))
            scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), keys) * kw["softmax_scale"]
            out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
        cls.calls.append({"rows": q.shape[0], "seqs": used.numel()})
        return out


@pytest.fixture
def fake_fa3(monkeypatch):
    from sparsed_vllm.kernels import utils

    FakeFA3.calls = []
    monkeypatch.setattr(fa3, "_fa3", lambda: FakeFA3)
    monkeypatch.setattr(fa3, "fa3_runs", lambda q: True)
    # The model runs on CPU tensors, which the input checks otherwise refuse.
    monkeypatch.setattr(utils, "on_kernel_device", lambda t: True)
    return FakeFA3


FAKE_CASES = [([32], [768], 4, 4, 128), ([0, 1, 7, 32], [5, 129, 300, 1000], 8, 2, 64)]


@pytest.mark.parametrize(
    "q_lens,kv_lens,n_heads,n_kv,page",
    FAKE_CASES,
    ids=[f"Q{'+'.join(map(str, c[0]))}-KV{'+'.join(map(str, c[1]))}" for c in FAKE_CASES],
)
def test_adapter_on_fa3_model(q_lens, kv_lens, n_heads, n_kv, page, fake_fa3, assert_close):
    q, kc, vc, cu, lens, table, _, _ = make_paged(
        q_lens, kv_lens, n_heads, n_kv, 64, page, torch.bfloat16, "cpu", seed=sum(kv_lens)
    )
    want = cached_attention_ref(q, kc, vc, cu, lens, table, 0.125)
    out = fa3.fa3_cached_attention(
        q, kc, vc, cu, lens, table, 0.125, max_seqlen_q=max(q_lens), max_kv_len=max(kv_lens)
    )
    assert_close("fa3-model", want, out, 1e-2)
    with pytest.raises(ValueError, match="block_table"):
        fa3.fa3_cached_attention(q, kc, vc, cu, lens, table.long(), 0.125, 32, 1000)


def test_executor_sends_dense_cached_groups_to_fa3(fake_fa3, monkeypatch, assert_close):
    """`cached_kernel="fa3"`: a step's dense cached windows go to FA3 (here its PyTorch model) in
    one call per layer, and equal the exact path; with "triton" FA3 is never called."""
    import sparsed_vllm.kernels as kernels

    from sparsed_vllm.core import staged

    page, n_heads, n_kv, scale = 16, 4, 2, 0.125
    windows_spec = [(32, 200, 400), (1, 99, 100), (7, 250, 257)]
    gen = torch.Generator().manual_seed(3)
    n_pages = [math.ceil(kv / page) for _, _, kv in windows_spec]
    perm = torch.randperm(sum(n_pages), generator=gen).split(n_pages)
    windows = [
        CachedWindow(rows, start, kv, pages, SequenceStage(DENSE, (j, 0), 0))
        for j, ((rows, start, kv), pages) in enumerate(zip(windows_spec, perm, strict=True))
    ]
    n_rows = sum(w.rows for w in windows)
    q = torch.randn(n_rows, n_heads, 64, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(n_rows, n_kv, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    cache = torch.randn(2, sum(n_pages), page, n_kv, 64, generator=gen).to(torch.bfloat16)
    ours = []

    def our_kernel(q, kc, vc, cu, lens, table, scale, **kw):
        ours.append(q.shape[0])
        return cached_attention_ref(q, kc, vc, cu, lens, table, scale)

    # Ours is Triton, which the CPU cannot run: a stand-in records that it was chosen.
    monkeypatch.setitem(vars(kernels), "cached_attention", our_kernel)
    runs = {}
    for kernel in ("fa3", "triton", "exact"):
        batch = AttentionBatch.build(
            [], q.device, [], PatternStore(), None, windows, cached_kernel=kernel
        )
        monkeypatch.setattr(staged, "use_kernels", lambda t, k=kernel: k != "exact")
        out = staged_attention(0, q, k, v, cache, batch, scale, torch.empty_like(q))
        runs[kernel] = out.clone()
    assert_close("executor-fa3", runs["exact"], runs["fa3"], 1e-2)
    assert fake_fa3.calls == [{"rows": n_rows, "seqs": 3}]  # one call for the three windows
    assert ours == [n_rows]  # "triton" ran ours, not FA3


def _skip_without_fa3():
    if not fa3.fa3_available():
        err = fa3.fa3_import_error() if torch.cuda.is_available() else None
        tail = " | ".join(err.strip().splitlines()[-2:]) if err else "no Hopper GPU"
        pytest.skip(f"FA3 not usable: {tail}")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "q_lens,kv_lens,n_heads,n_kv,head_dim,dtype,page",
    GPU_CASES,
    ids=[_case_id(*c) for c in GPU_CASES],
)
def test_fa3_matches_reference(q_lens, kv_lens, n_heads, n_kv, head_dim, dtype, page, assert_close):
    _skip_without_fa3()
    q, kc, vc, cu, lens, table, _, _ = make_paged(
        q_lens, kv_lens, n_heads, n_kv, head_dim, page, dtype, "cuda", seed=sum(kv_lens)
    )
    scale = head_dim**-0.5
    want = cached_attention_ref(q, kc, vc, cu, lens, table, scale)
    bounds = {"max_seqlen_q": max(q_lens), "max_kv_len": max(kv_lens)}
    out = fa3.fa3_cached_attention(q, kc, vc, cu, lens, table, scale, **bounds)
    assert_close("fa3", want, out, 1e-2)
    into = torch.zeros_like(q)
    got = fa3.fa3_cached_attention(q, kc, vc, cu, lens, table, scale, **bounds, out=into)
    assert got.data_ptr() == into.data_ptr()
    assert_close("fa3-out", want, into, 1e-2)
