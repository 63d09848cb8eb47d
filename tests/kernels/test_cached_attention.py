"""Attention against a paged KV cache: the reference against dense attention (CPU), and the Triton
kernel against the reference (GPU)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from sparsed_vllm.kernels import cached_attention_ref

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
DEVICE = "cuda"


def make_paged(q_lens, kv_lens, n_heads, n_kv, head_dim, page, dtype, device, seed, spare_pages=3):
    """A batch in a shuffled page pool, with each sequence's contiguous K/V beside it.

    Returns q, k_cache, v_cache (views into one `[2, num_pages, PAGE, Hkv, D]` cache),
    cu_seqlens_q, kv_lens, block_table, and the lists of contiguous `[kv_len, Hkv, D]` K and V.
    Rows past a sequence's keys and the spare pages hold NaN, and block-table entries past a
    sequence's pages are -1, so a kernel that reads either fails.
    """
    gen = torch.Generator().manual_seed(seed)
    n_pages = [-(-n // page) for n in kv_lens]
    perm = torch.randperm(sum(n_pages) + spare_pages, generator=gen)
    cache = torch.full((2, perm.numel(), page, n_kv, head_dim), float("nan"))
    table = torch.full((len(kv_lens), max(n_pages, default=0) + 1), -1, dtype=torch.int32)
    ks, vs = [], []
    used = perm[: sum(n_pages)].split(n_pages)
    for b, (n, pages) in enumerate(zip(kv_lens, used, strict=True)):
        k, v = (torch.randn(n, n_kv, head_dim, generator=gen) for _ in range(2))
        table[b, : len(pages)] = pages.to(torch.int32)
        for i, p in enumerate(pages.tolist()):
            rows = slice(i * page, min(n, (i + 1) * page))
            cache[0, p, : rows.stop - rows.start] = k[rows]
            cache[1, p, : rows.stop - rows.start] = v[rows]
        ks.append(k.to(device, dtype))
        vs.append(v.to(device, dtype))
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=gen).to(device, dtype)
    cu = torch.tensor([0, *q_lens]).cumsum(0).to(device=device, dtype=torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    cache = cache.to(device, dtype)
    return q, cache[0], cache[1], cu, lens, table.to(device), ks, vs


def dense_per_sequence(q, ks, vs, cu, scale):
    """Softmax attention in float64 of each sequence's rows to its contiguous K/V."""
    out = []
    for (s, e), k, v in zip(itertools.pairwise(cu.tolist()), ks, vs, strict=True):
        group = q.shape[1] // k.shape[1]
        kd, vd = (t.double().repeat_interleave(group, 1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), kd) * scale
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vd))
    return torch.cat(out)


def _case_id(q_lens, kv_lens, hq, hkv, d, dtype, page):
    qs, kvs = "+".join(map(str, q_lens)), "+".join(map(str, kv_lens))
    return f"Q{qs}-KV{kvs}-H{hq}-KV{hkv}-D{d}-{str(dtype)[6:]}-P{page}"


REF_CASES = [
    # (q_lens, kv_lens, Hq, Hkv, D, dtype, PAGE)
    ([5], [5], 2, 2, 16, torch.float32, 4),
    ([0, 1, 7, 32], [3, 40, 100, 77], 4, 2, 16, torch.float32, 16),
    ([3, 0, 9], [33, 0, 65], 6, 1, 8, torch.float32, 32),
    ([20, 4], [130, 20], 4, 4, 32, torch.bfloat16, 64),
    ([2, 3], [0, 10], 2, 1, 8, torch.float32, 16),
]


@pytest.mark.parametrize(
    "q_lens,kv_lens,n_heads,n_kv,head_dim,dtype,page",
    REF_CASES,
    ids=[_case_id(*c) for c in REF_CASES],
)
def test_reference_equals_dense(
    q_lens, kv_lens, n_heads, n_kv, head_dim, dtype, page, assert_close
):
    q, kc, vc, cu, lens, table, ks, vs = make_paged(
        q_lens, kv_lens, n_heads, n_kv, head_dim, page, dtype, "cpu", seed=sum(kv_lens)
    )
    out = cached_attention_ref(q, kc, vc, cu, lens, table, 0.3)
    want = dense_per_sequence(q, ks, vs, cu, 0.3)
    assert_close("ref", want, out, 1e-6 if dtype == torch.float32 else 1e-2)


def test_reference_whole_sequence_is_dense_attention(assert_close):
    """Query rows = the whole sequence, pages in order: plain bidirectional SDPA."""
    q, kc, vc, cu, lens, table, ks, vs = make_paged(
        [50], [50], 4, 2, 16, 16, torch.float32, "cpu", 1
    )
    table[0, :4] = torch.arange(4, dtype=torch.int32)
    kc[:4].flatten(0, 1)[:50], vc[:4].flatten(0, 1)[:50] = ks[0], vs[0]
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1), ks[0].transpose(0, 1), vs[0].transpose(0, 1), scale=0.25, enable_gqa=True
    )
    out = cached_attention_ref(q, kc, vc, cu, lens, table, 0.25)
    assert_close("whole", want.transpose(0, 1), out, 1e-6)


@pytest.mark.parametrize("start, rows", [(0, 70), (16, 8), (40, 30), (66, 4)])
def test_reference_with_patterns_is_block_sparse_attention_of_the_window(start, rows, assert_close):
    """A window's rows with a SparseD pattern equal those rows of block-sparse attention over
    the whole sequence (`core.pattern.block_sparse_attention_ref`), GQA, partial last tile."""
    from sparsed_vllm.core.pattern import TilePattern, block_sparse_attention_ref, num_tiles

    length, tile, gen = 70, 16, torch.Generator().manual_seed(5)
    _, kc, vc, _, lens, table, ks, vs = make_paged(
        [rows], [length], 4, 2, 16, 32, torch.float32, "cpu", 6
    )
    q_all = torch.randn(length, 4, 16, generator=gen)
    nb = num_tiles(length, tile)
    keep = torch.rand(4, nb, nb, generator=gen) < 0.4
    keep[..., 0] = True  # every query tile keeps at least one key tile
    pattern = TilePattern.from_dense_mask(keep, tile, length)
    want = block_sparse_attention_ref(q_all, ks[0], vs[0], pattern, 0.25)[start : start + rows]
    window = q_all[start : start + rows]
    cu = torch.tensor([0, rows], dtype=torch.int32)
    out = cached_attention_ref(window, kc, vc, cu, lens, table, 0.25, [pattern], [start])
    assert_close("window", want, out, 1e-6)
    dense = cached_attention_ref(window, kc, vc, cu, lens, table, 0.25, [None], [start])
    assert (dense - out).abs().max() > 1e-3  # the pattern did restrict the keys


GPU_CASES = [
    ([32], [768], 4, 4, 128, torch.bfloat16, 128),
    ([1, 7, 32], [1, 300, 1000], 4, 1, 64, torch.float16, 16),
    ([0, 1, 7, 32, 200], [50, 129, 333, 77, 513], 8, 2, 128, torch.bfloat16, 64),
    ([0, 1, 7, 32, 200], [0, 17, 250, 1000, 401], 4, 4, 64, torch.float16, 128),
    ([200, 0, 32], [1500, 10, 255], 14, 2, 128, torch.float16, 256),
    ([33, 5], [97, 1031], 7, 7, 64, torch.bfloat16, 32),
    ([32], [9000], 4, 1, 128, torch.bfloat16, 128),
    ([7, 32], [8300, 12001], 8, 8, 64, torch.float16, 256),
    ([32, 32, 32], [768, 700, 768], 28, 4, 128, torch.bfloat16, 128),
    ([224], [768], 28, 4, 128, torch.bfloat16, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "q_lens,kv_lens,n_heads,n_kv,head_dim,dtype,page",
    GPU_CASES,
    ids=[_case_id(*c) for c in GPU_CASES],
)
def test_cached_matches_reference(
    q_lens, kv_lens, n_heads, n_kv, head_dim, dtype, page, assert_close
):
    from sparsed_vllm.kernels import cached_attention

    q, kc, vc, cu, lens, table, _, _ = make_paged(
        q_lens, kv_lens, n_heads, n_kv, head_dim, page, dtype, DEVICE, seed=sum(kv_lens)
    )
    scale = head_dim**-0.5
    want = cached_attention_ref(q, kc, vc, cu, lens, table, scale)
    out = cached_attention(q, kc, vc, cu, lens, table, scale, max_kv_len=max(kv_lens))
    assert_close("cached", want, out, TOL[dtype])
    hinted = cached_attention(q, kc, vc, cu, lens, table, scale, max_seqlen_q=max(q_lens))
    assert_close("cached-max_seqlen_q", want, hinted, TOL[dtype])


LAUNCHES = {
    "split1": {"num_splits": 1},
    "split3": {"num_splits": 3},
    "split64": {"num_splits": 64},
    "no-pack": {"PACK_GQA": False, "num_splits": 2},
    "M16-N16": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2},
    "M64-N32-w4-s2": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    "M128-N64-w8-s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
}


@pytest.mark.gpu
@pytest.mark.parametrize("config", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_launch_configs_agree(config, assert_close):
    from sparsed_vllm.kernels import cached_attention

    q, kc, vc, cu, lens, table, _, _ = make_paged(
        [2, 3, 40], [0, 700, 2100], 8, 2, 128, 128, torch.bfloat16, DEVICE, seed=4, spare_pages=5
    )
    want = cached_attention_ref(q, kc, vc, cu, lens, table, 0.1)
    out = cached_attention(q, kc, vc, cu, lens, table, 0.1, config=config)
    assert_close("config", want, out, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_whole_sequence_equals_dense(head_dim, dtype, assert_close):
    """Query rows = all of each sequence's keys, pages in order: dense bidirectional attention."""
    from sparsed_vllm.kernels import cached_attention, dense_attention

    lens, page = [130, 700], 64
    q, kc, vc, cu, kv_lens, table, ks, vs = make_paged(
        lens, lens, 4, 2, head_dim, page, dtype, DEVICE, seed=3, spare_pages=0
    )
    n_pages = [-(-n // page) for n in lens]
    start = torch.tensor([0, *n_pages]).cumsum(0).tolist()
    for b, n in enumerate(n_pages):
        table[b, :n] = torch.arange(start[b], start[b] + n, dtype=torch.int32)
        kc[start[b] : start[b] + n].flatten(0, 1)[: lens[b]] = ks[b]
        vc[start[b] : start[b] + n].flatten(0, 1)[: lens[b]] = vs[b]
    out = cached_attention(q, kc, vc, cu, kv_lens, table, 0.1)
    want = dense_attention(q, torch.cat(ks), torch.cat(vs), cu, max(lens), 0.1, backend="math")
    assert_close("whole-sequence", want, out, TOL[dtype])


@pytest.mark.gpu
def test_interleaved_cache_and_strided_out(assert_close):
    """K and V interleaved per page (`[num_pages, 2, PAGE, Hkv, D]`), output into a wider buffer."""
    from sparsed_vllm.kernels import cached_attention

    q, kc, vc, cu, lens, table, _, _ = make_paged(
        [7, 32], [300, 4000], 8, 2, 64, 32, torch.float16, DEVICE, seed=6
    )
    kv = torch.stack([kc, vc], dim=1)  # [num_pages, 2, PAGE, Hkv, D]
    wide = torch.zeros(q.shape[0], q.shape[1], 2 * q.shape[2], dtype=q.dtype, device=DEVICE)
    out = cached_attention(q, kv[:, 0], kv[:, 1], cu, lens, table, 0.125, out=wide[..., :64])
    assert out.data_ptr() == wide.data_ptr()
    assert_close("interleaved", cached_attention_ref(q, kc, vc, cu, lens, table, 0.125), out, 5e-3)
    assert not wide[..., 64:].any()


@pytest.mark.gpu
def test_rejects_bad_inputs():
    from sparsed_vllm.kernels import cached_attention

    q, kc, vc, cu, lens, table, _, _ = make_paged(
        [4], [40], 4, 2, 64, 16, torch.float16, DEVICE, seed=0
    )
    with pytest.raises(ValueError, match="kv heads"):
        cached_attention(q[:, :3], kc, vc, cu, lens, table, 0.1)
    with pytest.raises(ValueError, match="block_table"):
        cached_attention(q, kc, vc, cu, lens, table.long(), 0.1)
    with pytest.raises(ValueError, match="batch sizes"):
        cached_attention(q, kc, vc, cu, lens.repeat(2), table, 0.1)
    with pytest.raises(ValueError, match="page size"):
        cached_attention(q, kc[:, :8], vc[:, :8], cu, lens, table, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "splits,max_seqlen_q", [(1, None), (4, None), (1, 32), (4, 32)], ids=lambda x: str(x)
)
def test_padding_rows_untouched(splits, max_seqlen_q, assert_close):
    """Rows before cu_seqlens_q[0] and after cu_seqlens_q[-1] (padding) are not written."""
    from sparsed_vllm.kernels import cached_attention

    q, kc, vc, cu, lens, table, _, _ = make_paged(
        [7, 32], [90, 1000], 8, 2, 64, 64, torch.float16, DEVICE, seed=8
    )
    # More leading rows than a query block: the searched grid's first blocks own no rows.
    lead, tail = 70, 5
    padded = torch.cat([q[:1].expand(lead, -1, -1), q, q[:tail]])
    out = torch.zeros_like(padded)
    cached_attention(
        *(padded, kc, vc, cu + lead, lens, table, 0.125),
        out=out,
        max_seqlen_q=max_seqlen_q,
        config={"num_splits": splits},
    )
    want = cached_attention_ref(q, kc, vc, cu, lens, table, 0.125)
    assert_close("padded", want, out[lead:-tail], 5e-3)
    assert not out[:lead].any() and not out[-tail:].any()
