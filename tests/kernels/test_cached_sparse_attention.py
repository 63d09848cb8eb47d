"""SparseD attention of cached windows: the Triton kernel (`kernels/cached/sparse.py`) against the
plain PyTorch reference (`cached_attention_ref` with patterns), on a GPU."""

import pytest
import torch
from sparsed_vllm.kernels import cached_attention_ref
from test_cached_attention import DEVICE, TOL, make_paged

from sparsed_vllm.core.pattern import TilePattern, num_tiles


def random_patterns(kv_lens, n_heads, tile, seed, density=0.35, device=DEVICE):
    """One pattern per sequence: random kept tiles, the first and (often) the partial last one
    among them, so every row has keys and the masked last tile is exercised."""
    gen = torch.Generator().manual_seed(seed)
    patterns = []
    for length in kv_lens:
        nb = num_tiles(max(length, 1), tile)
        keep = torch.rand(n_heads, nb, nb, generator=gen) < density
        keep[..., 0] = True
        keep[..., -1] |= torch.rand(n_heads, nb, generator=gen) < 0.5
        patterns.append(TilePattern.from_dense_mask(keep.to(device), tile, max(length, 1)))
    return patterns


CASES = [
    # (q_lens, kv_lens, q_starts, Hq, Hkv, D, dtype, PAGE, TILE)
    ([32], [768], [512], 32, 32, 128, torch.bfloat16, 128, 128),  # LLaDA, one tile
    ([32], [1000], [900], 8, 8, 128, torch.bfloat16, 128, 128),  # straddles tiles 7|8 (partial)
    ([1, 7, 32], [300, 1000, 4097], [299, 993, 4040], 4, 1, 64, torch.float16, 16, 32),
    ([0, 5, 32, 200], [50, 129, 2000, 401], [0, 124, 1000, 201], 8, 2, 128, torch.bfloat16, 64, 64),
    ([33, 5], [97, 1031], [64, 1026], 7, 7, 64, torch.bfloat16, 32, 16),
    ([32], [12001], [11969], 28, 4, 128, torch.bfloat16, 256, 128),  # Dream GQA, long
    ([32, 32, 32], [8300, 700, 768], [8268, 668, 0], 4, 4, 64, torch.float16, 128, 64),
    ([32, 32], [9000, 4000], [8800, 3968], 28, 4, 128, torch.float16, 64, 64),  # 7 heads a group
]


def _id(case):
    q_lens, kv_lens, starts, hq, hkv, d, dtype, page, tile = case
    return (
        f"Q{'+'.join(map(str, q_lens))}-KV{'+'.join(map(str, kv_lens))}-H{hq}-KV{hkv}-D{d}-"
        f"{str(dtype)[6:]}-P{page}-T{tile}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_reference(case, assert_close):
    from sparsed_vllm.kernels import cached_sparse_attention

    q_lens, kv_lens, starts, n_heads, n_kv, head_dim, dtype, page, tile = case
    q, kc, vc, cu, lens, table, _, _ = make_paged(
        q_lens, kv_lens, n_heads, n_kv, head_dim, page, dtype, DEVICE, seed=sum(kv_lens)
    )
    patterns = random_patterns(kv_lens, n_heads, tile, seed=len(kv_lens))
    scale = head_dim**-0.5
    want = cached_attention_ref(q, kc, vc, cu, lens, table, scale, patterns, starts)
    out = cached_sparse_attention(q, kc, vc, cu, lens, table, scale, patterns, starts, q_lens)
    assert_close("cached-sparse", want, out, TOL[dtype])
    # The pattern did restrict the keys (a kernel attending to everything would pass above only
    # if every pattern kept every tile).
    dense = cached_attention_ref(q, kc, vc, cu, lens, table, scale)
    assert (dense.float() - want.float()).abs().max() > 1e-2


LAUNCHES = {
    "split1": {"num_splits": 1},
    "split3": {"num_splits": 3},
    "split40": {"num_splits": 40},  # more splits than some heads keep tiles: empty shares
    "M16-N16": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2},
    "M64-N32-s2": {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 2},
    "M128-w8": {"BLOCK_M": 128, "num_warps": 8},
}


@pytest.mark.gpu
@pytest.mark.parametrize("config", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_launch_configs_agree(config, assert_close):
    from sparsed_vllm.kernels import cached_sparse_attention

    q_lens, kv_lens, starts = [2, 70, 32], [700, 2100, 3000], [698, 2000, 2950]
    q, kc, vc, cu, lens, table, _, _ = make_paged(
        q_lens, kv_lens, 8, 2, 128, 128, torch.bfloat16, DEVICE, seed=4, spare_pages=5
    )
    patterns = random_patterns(kv_lens, 8, 128, seed=9)
    want = cached_attention_ref(q, kc, vc, cu, lens, table, 0.1, patterns, starts)
    out = cached_sparse_attention(
        q, kc, vc, cu, lens, table, 0.1, patterns, starts, q_lens, config=config
    )
    assert_close("config", want, out, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv,page", [(8, 128), (2, 32)])
def test_every_tile_kept_equals_dense_cached(n_kv, page, assert_close):
    """A pattern keeping every tile gives the dense cached kernel's output."""
    from sparsed_vllm.kernels import cached_attention, cached_sparse_attention

    q_lens, kv_lens, starts = [32, 9], [5000, 333], [4900, 324]
    q, kc, vc, cu, lens, table, _, _ = make_paged(
        q_lens, kv_lens, 8, n_kv, 128, page, torch.bfloat16, DEVICE, seed=2
    )
    full = [TilePattern.full(8, n, 128, device=DEVICE) for n in kv_lens]
    out = cached_sparse_attention(q, kc, vc, cu, lens, table, 0.09, full, starts, q_lens)
    dense = cached_attention(q, kc, vc, cu, lens, table, 0.09)
    assert_close("all-kept", dense, out, 1e-2)


@pytest.mark.gpu
def test_rejects_bad_inputs():
    from sparsed_vllm.kernels import cached_sparse_attention

    q, kc, vc, cu, lens, table, _, _ = make_paged(
        [4], [400], 4, 2, 64, 16, torch.float16, DEVICE, seed=0
    )
    patterns = random_patterns([400], 4, 64, seed=0)
    with pytest.raises(ValueError, match="patterns"):
        cached_sparse_attention(q, kc, vc, cu, lens, table, 0.1, [], [0], [4])
    with pytest.raises(ValueError, match="tile size"):
        bad = TilePattern.full(4, 400, 256, device=DEVICE)
        cached_sparse_attention(q, kc, vc, cu, lens, table, 0.1, [bad], [0], [4])
    with pytest.raises(ValueError, match="query head"):
        cached_sparse_attention(
            q, kc, vc, cu, lens, table, 0.1, random_patterns([400], 2, 64, 0), [0], [4]
        )
    with pytest.raises(ValueError, match="smaller than the 2 heads"):
        cached_sparse_attention(
            q, kc, vc, cu, lens, table, 0.1, patterns, [0], [4], config={"BLOCK_M": 1}
        )
    with pytest.raises(ValueError, match="BLOCK_N"):
        cached_sparse_attention(
            q, kc, vc, cu, lens, table, 0.1, patterns, [0], [4], config={"BLOCK_N": 32}
        )
