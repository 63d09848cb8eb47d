"""Triton block-sparse attention against the PyTorch reference (GPU)."""

import pytest
import torch
from sparsed_vllm.kernels import sparse_attention_ref

from sparsed_vllm.core.pattern import (
    TilePattern,
    default_scale,
    num_kept_tiles,
    num_tiles,
    pack_patterns,
)

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}


def random_pattern(n_heads, seq_len, block_size, select, gen):
    """Random top-k style pattern: `num_kept_tiles(nb, select)` tiles per (head, query tile)."""
    nb = num_tiles(seq_len, block_size)
    scores = torch.rand(n_heads, nb, nb, generator=gen)
    kept = scores.topk(num_kept_tiles(nb, select), dim=-1).indices
    mask = torch.zeros(n_heads, nb, nb, dtype=torch.bool).scatter_(-1, kept, True)
    return TilePattern.from_dense_mask(mask, block_size, seq_len)


def make_batch(lens, n_heads, n_kv, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q, k, v = (
        torch.randn(total, h, head_dim, generator=gen).to("cuda", dtype)
        for h in (n_heads, n_kv, n_kv)
    )
    cu = torch.tensor([0, *lens]).cumsum(0).to(device="cuda", dtype=torch.int32)
    return q, k, v, cu, gen


def to_cuda(packed):
    packed.kv_indices = packed.kv_indices.cuda()
    packed.kv_counts = packed.kv_counts.cuda()
    packed.q_tile_offsets = packed.q_tile_offsets.cuda()
    return packed


CASES = [
    # (lens, Hq, Hkv, D, dtype, tile, select)
    ([1000], 4, 4, 128, torch.bfloat16, 128, 0.3),
    ([37, 300, 1025], 4, 2, 64, torch.float16, 128, 0.3),
    ([129, 511], 4, 1, 128, torch.float16, 64, 0.5),
    ([77, 200], 2, 2, 64, torch.bfloat16, 32, 0.1),
    ([1, 128, 2048], 8, 2, 128, torch.bfloat16, 128, 0.1),
    ([300], 2, 1, 64, torch.bfloat16, 16, 0.3),
]


def _case_id(c):
    lens, hq, hkv, d, dtype, tile, sel = c
    return f"L{'+'.join(map(str, lens))}-H{hq}-KV{hkv}-D{d}-{str(dtype)[6:]}-T{tile}-s{sel}"


@pytest.mark.parametrize(
    "lens,n_heads,n_kv,head_dim,dtype,tile,select", CASES, ids=[_case_id(c) for c in CASES]
)
def test_sparse_matches_reference(lens, n_heads, n_kv, head_dim, dtype, tile, select, assert_close):
    from sparsed_vllm.kernels import sparse_attention

    q, k, v, cu, gen = make_batch(lens, n_heads, n_kv, head_dim, dtype, seed=sum(lens))
    pattern = to_cuda(pack_patterns([random_pattern(n_heads, n, tile, select, gen) for n in lens]))
    scale = default_scale(head_dim)
    out = sparse_attention(q, k, v, cu, pattern, scale)
    assert_close("sparse", sparse_attention_ref(q, k, v, cu, pattern, scale), out, TOL[dtype])


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_all_tiles_kept_equals_dense(head_dim, dtype, assert_close):
    from sparsed_vllm.kernels import dense_attention, sparse_attention

    lens = [130, 700]
    q, k, v, cu, _ = make_batch(lens, 4, 2, head_dim, dtype, seed=3)
    pattern = to_cuda(pack_patterns([TilePattern.full(4, n, 128) for n in lens]))
    out = sparse_attention(q, k, v, cu, pattern, 0.1)
    want = dense_attention(q, k, v, cu, max(lens), 0.1, backend="math")
    assert_close("full-pattern", want, out, TOL[dtype])


@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "USE_TMA": True},
    ],
    ids=["M64-N64", "M128-N64", "TMA-M128-N128", "TMA-M64-N64"],
)
def test_launch_configs_agree(config, assert_close):
    from sparsed_vllm.kernels import sparse_attention

    lens = [333, 901]
    q, k, v, cu, gen = make_batch(lens, 4, 2, 128, torch.bfloat16, seed=5)
    pattern = to_cuda(pack_patterns([random_pattern(4, n, 128, 0.3, gen) for n in lens]))
    out = sparse_attention(q, k, v, cu, pattern, 0.1, config=config)
    assert_close("config", sparse_attention_ref(q, k, v, cu, pattern, 0.1), out, 1e-2)


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "TMA"])
def test_strided_qkv_from_fused_projection(use_tma, assert_close):
    """q, k, v as views into one [T, (Hq + 2 Hkv) * D] projection output, as a model produces."""
    from sparsed_vllm.kernels import sparse_attention

    lens, hq, hkv, d = [257, 400], 4, 2, 64
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(sum(lens), hq + 2 * hkv, d, generator=gen).to("cuda", torch.bfloat16)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    cu = torch.tensor([0, *lens]).cumsum(0).to(device="cuda", dtype=torch.int32)
    pattern = to_cuda(pack_patterns([random_pattern(hq, n, 64, 0.3, gen) for n in lens]))
    out = sparse_attention(q, k, v, cu, pattern, 0.125, config={"USE_TMA": use_tma})
    assert_close("strided", sparse_attention_ref(q, k, v, cu, pattern, 0.125), out, 1e-2)
