"""SparseD selection and the compact pattern format, against a straightforward re-implementation."""

import math

import pytest
import torch

from sparsed_vllm.core.pattern import (
    TilePattern,
    block_sparse_attention_gather,
    block_sparse_attention_ref,
    default_scale,
    dense_attention_ref,
    generation_start_tile,
    llada_reference_scale,
    num_kept_tiles,
    pack_patterns,
    select_pattern,
)


def naive_selection(q, k, gen_length, bs, select, scale):
    """The algorithm as written, on the whole L x L matrix in float64: bool [Hq, nb, nb]."""
    seq_len, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    nb = math.ceil(seq_len / bs)
    g = next((t for t in range(nb) if seq_len - t * bs <= gen_length), nb - 1)
    mask = torch.zeros(n_heads, nb, nb, dtype=torch.bool)
    for h in range(n_heads):
        scores = q[:, h].double() @ k[:, h // group].double().T * scale  # [L, L]
        full = _tile_means(torch.softmax(scores, dim=-1), bs, nb, nb)
        gen = _tile_means(torch.softmax(scores[:, g * bs :], dim=-1), bs, nb, nb - g)
        for i in range(nb):
            top_all = full[i].argsort(descending=True)[: max(1, int(nb * select) + 1)]
            top_gen = gen[i].argsort(descending=True)[: max(1, int((nb - g) * select) + 1)]
            mask[h, i, [t for t in top_all.tolist() if t < g]] = True
            mask[h, i, (top_gen + g).tolist()] = True
    return mask


def _tile_means(probs, bs, n_rows, n_cols):
    padded = torch.zeros(n_rows * bs, n_cols * bs, dtype=probs.dtype)
    padded[: probs.shape[0], : probs.shape[1]] = probs
    return padded.view(n_rows, bs, n_cols, bs).mean(dim=(1, 3))


def _qkv(seq_len, n_heads, n_kv_heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_len, n_heads, head_dim, generator=gen)
    k = torch.randn(seq_len, n_kv_heads, head_dim, generator=gen)
    v = torch.randn(seq_len, n_kv_heads, head_dim, generator=gen)
    return q, k, v


CASES = [
    # (L, Hq, Hkv, bs, select, gen_length)
    (1, 2, 2, 32, 0.3, 0),
    (37, 2, 1, 16, 0.3, 10),
    (128, 4, 4, 32, 0.5, 32),
    (200, 4, 2, 32, 0.3, 50),  # tile 4 straddles the prompt/generation boundary
    (333, 4, 1, 32, 0.1, 100),
    (257, 2, 2, 64, 0.5, 0),  # no generation: g is the last tile
    (160, 2, 1, 32, 0.3, 500),  # all generation: g = 0
    (300, 2, 2, 32, 1.0, 64),  # select 1: k clamps to the tile count
]


@pytest.mark.parametrize("scale_kind", ["head_dim", "llada"])
@pytest.mark.parametrize(
    "seq_len,n_heads,n_kv,bs,select,gen_length",
    CASES,
    ids=[f"L{c[0]}-H{c[1]}-KV{c[2]}-bs{c[3]}-s{c[4]}-gen{c[5]}" for c in CASES],
)
def test_selection_matches_naive(seq_len, n_heads, n_kv, bs, select, gen_length, scale_kind):
    q, k, _ = _qkv(seq_len, n_heads, n_kv, 16, seed=seq_len)
    scale = default_scale(16) if scale_kind == "head_dim" else llada_reference_scale(32)
    pattern = select_pattern(q, k, gen_length, block_size=bs, select=select, scale=scale)
    expected = naive_selection(q, k, gen_length, bs, select, scale)
    assert torch.equal(pattern.to_dense_mask(), expected)


def test_generation_start_tile():
    # 200 tokens, 50 generated, tiles of 32: tile 4 (128..159) holds prompt token 149 -> prompt.
    assert generation_start_tile(200, 50, 32) == 5
    assert generation_start_tile(256, 64, 32) == 6  # boundary on a tile edge
    assert generation_start_tile(256, 0, 32) == 7  # no generation: the last tile
    assert generation_start_tile(256, 1000, 32) == 0


def test_num_kept_tiles():
    assert num_kept_tiles(512, 0.3) == 154
    assert num_kept_tiles(3, 0.0) == 1
    assert num_kept_tiles(4, 1.0) == 4


def test_compact_format_roundtrip():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 5, 5, generator=gen) < 0.4
    mask[:, :, 0] = True
    pattern = TilePattern.from_dense_mask(mask, block_size=32, seq_len=150)
    assert pattern.kv_indices.dtype == torch.int32 and pattern.kv_counts.dtype == torch.int32
    assert pattern.kv_indices.shape == (3, 5, int(mask.sum(-1).max()))
    assert torch.equal(pattern.kv_counts, mask.sum(-1).int())
    valid = torch.arange(pattern.kv_indices.shape[-1]) < pattern.kv_counts[..., None]
    assert bool((pattern.kv_indices[~valid] == -1).all())
    assert bool((pattern.kv_indices[..., 1:] > pattern.kv_indices[..., :-1])[valid[..., 1:]].all())
    assert torch.equal(pattern.to_dense_mask(), mask)
    assert pattern.kept_fraction() == pytest.approx(mask.float().mean().item())


def test_pack_unpack():
    patterns = [TilePattern.full(2, 100, 32), TilePattern.full(2, 33, 32)]
    packed = pack_patterns(patterns)
    assert packed.q_tile_offsets.tolist() == [0, 4, 6]
    assert packed.kv_indices.shape == (2, 6, 4)
    assert packed.kv_indices[0, 4].tolist() == [0, 1, -1, -1]
    for got, want in zip(packed.unpack(), patterns, strict=True):
        assert torch.equal(got.to_dense_mask(), want.to_dense_mask())


@pytest.mark.parametrize("seq_len,n_heads,n_kv", [(1, 2, 1), (100, 4, 2), (257, 2, 2)])
def test_full_pattern_equals_dense(seq_len, n_heads, n_kv):
    q, k, v = _qkv(seq_len, n_heads, n_kv, 16, seed=1)
    scale = default_scale(16)
    selected = select_pattern(q, k, gen_length=40, block_size=32, select=1.0, scale=scale)
    assert selected.kept_fraction() == 1.0
    sparse = block_sparse_attention_ref(q, k, v, selected, scale)
    torch.testing.assert_close(sparse, dense_attention_ref(q, k, v, scale))


def test_sparse_attention_softmax_over_kept_keys_only():
    q, k, v = _qkv(70, 2, 1, 8, seed=2)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[:, :, 1] = True  # every query sees only keys 32..63
    pattern = TilePattern.from_dense_mask(mask, block_size=32, seq_len=70)
    out = block_sparse_attention_ref(q, k, v, pattern, scale=0.5)
    scores = torch.einsum("lhd,nhd->hln", q, k[32:64].expand(-1, 2, -1)) * 0.5
    want = torch.einsum("hln,nhd->lhd", scores.softmax(-1), v[32:64].expand(-1, 2, -1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "seq_len,n_heads,n_kv,bs", [(1, 2, 1, 16), (70, 4, 2, 32), (257, 2, 2, 32), (300, 3, 1, 64)]
)
def test_gather_path_equals_reference_on_random_patterns(seq_len, n_heads, n_kv, bs):
    q, k, v = _qkv(seq_len, n_heads, n_kv, 16, seed=seq_len)
    nb = math.ceil(seq_len / bs)
    g = torch.Generator().manual_seed(seq_len)
    mask = torch.rand(n_heads, nb, nb, generator=g) < 0.4  # uneven counts per head and tile
    mask[..., torch.arange(nb), torch.arange(nb)] = True  # at least one tile per row
    for pattern in (
        TilePattern.from_dense_mask(mask, bs, seq_len),
        TilePattern.full(n_heads, seq_len, bs),
    ):
        want = block_sparse_attention_ref(q, k, v, pattern, 0.3)
        got = block_sparse_attention_gather(q, k, v, pattern, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    full = block_sparse_attention_gather(q, k, v, TilePattern.full(n_heads, seq_len, bs), 0.3)
    torch.testing.assert_close(full, dense_attention_ref(q, k, v, 0.3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pattern is for"):
        block_sparse_attention_gather(q[:-1], k[:-1], v[:-1], pattern, 0.3)
