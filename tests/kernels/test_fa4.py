"""FlashAttention-4 block-sparse adapter: the list conversion (CPU) and the kernel against the
PyTorch reference (GPU, skipped when FA4 does not import). Every GPU call returns the LSE, and
only tiles 128 (MHA and GQA) and 256 (MHA) run, so CuTe compiles three kernels in all."""

import math
from typing import NamedTuple

import pytest
import torch
from sparsed_vllm.kernels import sparse_attention_ref
from sparsed_vllm.kernels.block_sparse.fa4 import (
    check_fa4_tile,
    fa4_available,
    fa4_block_sparse_tensors,
    fa4_import_error,
    fa4_varlen_block_sparse_tensors,
)
from test_sparse_attention import make_batch, random_pattern, to_cuda

from sparsed_vllm.core.pattern import (
    TilePattern,
    default_scale,
    dense_attention_ref,
    num_tiles,
    pack_patterns,
    tile_mask_to_token_mask,
)


def loop_lists(pattern: TilePattern):
    """Plain loop: per (head, query tile), the 128-key n-blocks that hold kept keys."""
    f = pattern.block_size // 128
    n_blocks = math.ceil(pattern.seq_len / 128)
    lists = {}
    for h in range(pattern.kv_indices.shape[0]):
        for i in range(pattern.kv_indices.shape[1]):
            tiles = pattern.kv_indices[h, i, : pattern.kv_counts[h, i]].tolist()
            lists[h, i] = [t * f + s for t in tiles for s in range(f) if t * f + s < n_blocks]
    return lists


CONVERT_CASES = [
    (1000, 128, 0.3),
    (1024, 128, 0.5),
    (300, 256, 0.5),
    (1, 128, 1.0),
    (777, 256, 0.1),
]


@pytest.mark.parametrize(
    "seq_len,tile,select", CONVERT_CASES, ids=[f"L{c[0]}-T{c[1]}-s{c[2]}" for c in CONVERT_CASES]
)
def test_lists_match_loop(seq_len, tile, select):
    pattern = random_pattern(4, seq_len, tile, select, torch.Generator().manual_seed(seq_len))
    got = fa4_block_sparse_tensors(pattern.kv_indices, pattern.kv_counts, tile, seq_len)
    nq = pattern.kv_counts.shape[1]
    assert got["full_block_cnt"].shape == (1, 4, nq)
    assert got["full_block_idx"].shape[-1] <= math.ceil(seq_len / 128)
    assert all(t.dtype == torch.int32 for t in got.values())
    assert torch.equal(got["mask_block_cnt"], torch.zeros(1, 4, nq, dtype=torch.int32))
    assert got["mask_block_idx"].shape == (1, 4, nq, 1)
    for (h, i), want in loop_lists(pattern).items():
        count = int(got["full_block_cnt"][0, h, i])
        assert got["full_block_idx"][0, h, i, :count].tolist() == want, (h, i)


def test_batch_of_equal_lengths_stacks():
    gen = torch.Generator().manual_seed(1)
    pats = [random_pattern(2, 900, 128, 0.3, gen) for _ in range(3)]
    width = max(p.kv_indices.shape[-1] for p in pats)
    pad = [
        torch.nn.functional.pad(p.kv_indices, (0, width - p.kv_indices.shape[-1]), value=-1)
        for p in pats
    ]
    idx = torch.stack(pad)
    cnt = torch.stack([p.kv_counts for p in pats])
    batch = fa4_block_sparse_tensors(idx, cnt, 128, 900)
    for b, p in enumerate(pats):
        one = fa4_block_sparse_tensors(p.kv_indices, p.kv_counts, 128, 900)
        assert torch.equal(batch["full_block_cnt"][b], one["full_block_cnt"][0])
        w = one["full_block_idx"].shape[-1]
        counts = one["full_block_cnt"][0]
        keep = torch.arange(w) < counts[..., None]
        assert torch.equal(
            batch["full_block_idx"][b, ..., :w][keep], one["full_block_idx"][0][keep]
        )


def test_varlen_lists_match_loop():
    gen = torch.Generator().manual_seed(2)
    lens = [37, 300, 1025]
    pats = [random_pattern(3, n, 128, 0.3, gen) for n in lens]
    got = fa4_varlen_block_sparse_tensors(pack_patterns(pats))
    nqs = [num_tiles(n, 128) for n in lens]
    assert got["cu_total_m_blocks"].tolist() == [0, 1, 4, 13]
    assert got["cu_block_idx_offsets"].tolist() == [0, 1, 10, 91]
    assert got["full_block_idx"].shape == (3, 91) and got["mask_block_idx"].shape == (3, 91)
    assert not got["mask_block_cnt"].any()
    for b, p in enumerate(pats):
        m0, i0 = sum(nqs[:b]), got["cu_block_idx_offsets"][b].item()
        for (h, i), want in loop_lists(p).items():
            count = int(got["full_block_cnt"][h, m0 + i])
            row = i0 + i * nqs[b]
            assert got["full_block_idx"][h, row : row + count].tolist() == want, (b, h, i)


@pytest.mark.parametrize(
    "tile,head_dim,arch", [(64, 128, 9), (128, 128, 10), (384, 128, 10), (128, 256, 9)]
)
def test_unsupported_tiles_raise(tile, head_dim, arch):
    with pytest.raises(ValueError, match="FA4 block sparsity"):
        check_fa4_tile(tile, head_dim, arch)


def test_supported_tiles_pass():
    for tile, arch in [(128, 9), (256, 9), (384, 9), (256, 10), (512, 10)]:
        check_fa4_tile(tile, 128, arch)


def test_available_is_a_bool_without_gpu():
    assert isinstance(fa4_available(), bool)
    if not torch.cuda.is_available():
        assert not fa4_available()


class FakeBlockSparseTensors(NamedTuple):
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None


def _fake_attention(q, k, v, allowed, scale):
    """q `[L, H, D]`, allowed bool `[H, L, L]` -> out `[L, H, D]`, natural-log lse `[H, L]`."""
    qf = q.float().transpose(0, 1)
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1).transpose(0, 1)
    scores = (qf @ kf.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(0, 1).to(q.dtype), scores.logsumexp(-1)


def _allow(allowed, h, rows, cnt, idx):
    for n in idx[: int(cnt)].tolist():
        allowed[h, rows, n * 128 : (n + 1) * 128] = True


class FakeFA4:
    """FA4's block-sparse contract as read from its sources, in PyTorch: the query rows of m-block
    (tile) `m` attend to the 128-key n-blocks listed for it, mask and full alike, cut at the
    sequence end. Lets the CPU tests check the adapter's slicing, bounds and LSE layout."""

    @staticmethod
    def flash_attn_func(q, k, v, softmax_scale, block_sparse_tensors, return_lse, out, **_):
        t, seq_len, n_heads = block_sparse_tensors, q.shape[1], q.shape[2]
        tile = t.block_size[0]
        allowed = torch.zeros(n_heads, seq_len, seq_len, dtype=torch.bool)
        for h in range(n_heads):
            for m in range(t.full_block_cnt.shape[2]):
                rows = slice(m * tile, (m + 1) * tile)
                _allow(allowed, h, rows, t.mask_block_cnt[0, h, m], t.mask_block_idx[0, h, m])
                _allow(allowed, h, rows, t.full_block_cnt[0, h, m], t.full_block_idx[0, h, m])
        o, lse = _fake_attention(q[0], k[0], v[0], allowed, softmax_scale)
        out[0] = o
        return out, lse[None] if return_lse else None

    @staticmethod
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, softmax_scale, block_sparse_tensors, **kw):
        t, bounds = block_sparse_tensors, cu_seqlens_q.tolist()
        out, lse = torch.empty_like(q), torch.empty(q.shape[1], q.shape[0])
        for b in range(len(bounds) - 1):
            s, e = bounds[b], bounds[b + 1]
            n_blocks = math.ceil((e - s) / 128)
            allowed = torch.zeros(q.shape[1], e - s, e - s, dtype=torch.bool)
            for h in range(q.shape[1]):
                for m in range(n_blocks):
                    row = int(t.cu_block_idx_offsets[b]) + m * n_blocks
                    i = int(t.cu_total_m_blocks[b]) + m
                    rows = slice(m * 128, (m + 1) * 128)
                    _allow(allowed, h, rows, t.full_block_cnt[h, i], t.full_block_idx[h, row:])
                    _allow(allowed, h, rows, t.mask_block_cnt[h, i], t.mask_block_idx[h, row:])
            out[s:e], lse[:, s:e] = _fake_attention(q[s:e], k[s:e], v[s:e], allowed, softmax_scale)
        return out, lse if kw["return_lse"] else None


@pytest.fixture
def fake_fa4(monkeypatch):
    from sparsed_vllm.kernels import utils
    from sparsed_vllm.kernels.block_sparse import fa4

    monkeypatch.setattr(fa4, "_fa4", lambda: (FakeFA4, FakeBlockSparseTensors))
    # The model runs on CPU tensors, which the input checks otherwise refuse.
    monkeypatch.setattr(utils, "on_kernel_device", lambda t: True)
    return fa4


FAKE_CASES = [([1000], 4, 4, 128), ([37, 300, 1025], 4, 2, 128), ([300, 700], 2, 1, 256)]


@pytest.mark.parametrize(
    "lens,n_heads,n_kv,tile",
    FAKE_CASES,
    ids=[f"L{c[0]}-H{c[1]}-KV{c[2]}-T{c[3]}" for c in FAKE_CASES],
)
def test_adapter_on_fa4_model(lens, n_heads, n_kv, tile, fake_fa4, assert_close):
    gen = torch.Generator().manual_seed(sum(lens))
    q, k, v = (
        torch.randn(sum(lens), h, 64, generator=gen).to(torch.bfloat16)
        for h in (n_heads, n_kv, n_kv)
    )
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    patterns = [random_pattern(n_heads, n, tile, 0.3, gen) for n in lens]
    packed = pack_patterns(patterns)
    out, lse = fake_fa4.fa4_sparse_attention(q, k, v, cu, packed, 0.125, return_lse=True)
    assert_close("fa4-model", sparse_attention_ref(q, k, v, cu, packed, 0.125), out, 1e-3)
    assert_close("fa4-model-lse", lse_ref(q, k, cu, patterns, 0.125), lse, 1e-5)
    if tile == 128:
        out, lse = fake_fa4.fa4_sparse_attention_varlen(q, k, v, cu, packed, 0.125, True)
        assert_close(
            "fa4-model-varlen", sparse_attention_ref(q, k, v, cu, packed, 0.125), out, 1e-5
        )
        assert_close("fa4-model-varlen-lse", lse_ref(q, k, cu, patterns, 0.125), lse, 1e-5)


def _skip_without_fa4():
    if not fa4_available():
        err = fa4_import_error() if torch.cuda.is_available() else None
        tail = " | ".join(err.strip().splitlines()[-3:]) if err else "no Hopper/Blackwell GPU"
        pytest.skip(f"FA4 not usable: {tail}")


def lse_ref(q, k, cu, patterns, scale):
    """Natural-log LSE `[Hq, T]` over each row's kept keys, in fp32."""
    out, bounds = [], cu.tolist()
    for b, p in enumerate(patterns):
        s, e = bounds[b], bounds[b + 1]
        qf = q[s:e].float().transpose(0, 1)
        kf = k[s:e].float().repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(0, 1)
        scores = qf @ kf.transpose(1, 2) * scale
        mask = tile_mask_to_token_mask(p).to(scores.device)
        out.append(scores.masked_fill(~mask, float("-inf")).logsumexp(-1))
    return torch.cat(out, dim=1)


GPU_CASES = [
    # (lens, Hq, Hkv, tile, select): LLaDA 32/32 odd length; GQA 32/8 varlen batch with a
    # one-tile sequence; tile 256 (two m-blocks per list, a dropped n-block past the end).
    ([1000], 32, 32, 128, 0.3),
    ([1100, 100, 2049], 32, 8, 128, 0.3),
    ([300, 777], 4, 4, 256, 0.5),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lens,n_heads,n_kv,tile,select",
    GPU_CASES,
    ids=[f"L{'+'.join(map(str, c[0]))}-H{c[1]}-KV{c[2]}-T{c[3]}-s{c[4]}" for c in GPU_CASES],
)
def test_fa4_matches_reference(lens, n_heads, n_kv, tile, select, assert_close):
    _skip_without_fa4()
    from sparsed_vllm.kernels.block_sparse.fa4 import fa4_sparse_attention

    q, k, v, cu, gen = make_batch(lens, n_heads, n_kv, 128, torch.bfloat16, seed=sum(lens))
    patterns = [random_pattern(n_heads, n, tile, select, gen) for n in lens]
    packed = to_cuda(pack_patterns(patterns))
    scale = default_scale(128)
    out, lse = fa4_sparse_attention(q, k, v, cu, packed, scale, return_lse=True)
    assert_close("fa4", sparse_attention_ref(q, k, v, cu, packed, scale), out, 1e-2)
    assert_close("fa4-lse", lse_ref(q, k, cu, patterns, scale), lse, 1e-4)


@pytest.mark.gpu
def test_fa4_all_tiles_kept_equals_dense(assert_close):
    _skip_without_fa4()
    from sparsed_vllm.kernels.block_sparse.fa4 import fa4_sparse_attention

    lens = [130, 1000]
    q, k, v, cu, _ = make_batch(lens, 32, 32, 128, torch.bfloat16, seed=3)
    patterns = [TilePattern.full(32, n, 128) for n in lens]
    out, lse = fa4_sparse_attention(q, k, v, cu, to_cuda(pack_patterns(patterns)), 0.1, True)
    bounds = [(0, 130), (130, 1130)]
    want = torch.cat([dense_attention_ref(q[s:e], k[s:e], v[s:e], 0.1) for s, e in bounds])
    assert_close("fa4-dense", want, out, 1e-2)
    assert_close("fa4-dense-lse", lse_ref(q, k, cu, patterns, 0.1), lse, 1e-4)


def test_executor_sends_sparse_groups_to_fa4(fake_fa4, monkeypatch, assert_close):
    """`sparse_kernel="fa4"`: the staged executor's sparse group goes to FA4 (here its PyTorch
    model) with each pattern's lists built once per (sequence, layer), and equals the exact path."""
    from sparsed_vllm.core import staged
    from sparsed_vllm.core.sparsed import SPARSE, PatternStore
    from sparsed_vllm.core.staged import AttentionBatch, SequenceStage, staged_attention

    lens, n_heads, n_kv, scale = [300, 129], 4, 2, 0.125
    gen = torch.Generator().manual_seed(5)
    store = PatternStore()
    stages = [SequenceStage(SPARSE, (i, 0), 16, 128, 0.3) for i in range(len(lens))]
    for layer in (0, 1):
        for i, n in enumerate(lens):
            store.put((i, 0), layer, random_pattern(n_heads, n, 128, 0.3, gen))
    q, k, v = (
        torch.randn(sum(lens), h, 64, generator=gen).to(torch.bfloat16)
        for h in (n_heads, n_kv, n_kv)
    )
    prepared, prepare = [], fake_fa4.prepare_fa4_sequence

    def counted(pattern):
        prepared.append(pattern)
        return prepare(pattern)

    monkeypatch.setattr(fake_fa4, "prepare_fa4_sequence", counted)
    monkeypatch.setattr(fake_fa4, "fa4_runs", lambda tile, head_dim, device: tile == 128)
    batch = AttentionBatch.build(lens, q.device, stages, store, sparse_kernel="fa4")
    exact = AttentionBatch.build(lens, q.device, stages, store)
    for step in range(2):
        for layer in (0, 1):
            monkeypatch.setattr(staged, "use_kernels", lambda t: True)
            out = staged_attention(layer, q, k, v, None, batch, scale, torch.empty_like(q))
            monkeypatch.setattr(staged, "use_kernels", lambda t: False)
            ref = staged_attention(layer, q, k, v, None, exact, scale, torch.empty_like(q))
            assert_close(f"executor-fa4-{step}-{layer}", ref, out, 1e-3)
    # Two sequences x two layers, converted once each although each ran twice.
    assert len(prepared) == 4
