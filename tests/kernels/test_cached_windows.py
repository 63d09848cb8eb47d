"""The host-side plan of cached-window SparseD attention (`kernels/cached/windows.py`, CPU)."""

import pytest
import torch
from sparsed_vllm.kernels.cached.windows import pack_lists, window_items, window_lists

from sparsed_vllm.core.pattern import TilePattern


def test_items_cover_each_row_once_within_one_query_tile():
    q_lens, starts = [0, 32, 200, 7], [5, 250, 100, 127]
    items, tiles = window_items(q_lens, starts, 128, 64)
    assert tiles == [(0, 0), (1, 3), (0, 3), (0, 2)]
    covered = {b: [] for b in range(4)}
    for b, lo, hi, packed in items:
        assert 0 < hi - lo <= 64
        first, tile = starts[b] // 128, (starts[b] + lo) // 128
        assert (starts[b] + hi - 1) // 128 == tile
        assert packed == sum(e - a for a, e in tiles[:b]) + tile - first
        covered[b] += list(range(lo, hi))
    assert all(sorted(covered[b]) == list(range(q_lens[b])) for b in range(4))


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 1), (28, 4), (6, 2)])
def test_lists_keep_exactly_each_heads_tiles(n_heads, n_kv):
    """Per head group: the union of its heads' kept tiles, ascending, and for each listed tile
    the heads that keep it; without GQA the pattern's own rows (views)."""
    gen = torch.Generator().manual_seed(n_heads)
    nb, first, end = 11, 3, 6
    keep = torch.rand(n_heads, nb, nb, generator=gen) < 0.3
    keep[..., 0] = True
    pattern = TilePattern.from_dense_mask(keep, 16, nb * 16 - 5)
    lists = window_lists(pattern, first, end, n_kv)
    group = n_heads // n_kv
    if group == 1:
        assert lists.head_bits is None
        assert lists.kv_indices.data_ptr() == pattern.kv_indices[:, first:end].data_ptr()
        return
    for g in range(n_kv):
        for t in range(end - first):
            count = int(lists.kv_counts[g, t])
            listed = lists.kv_indices[g, t, :count].tolist()
            assert listed == sorted(set(listed))
            assert (lists.kv_indices[g, t, count:] == -1).all()
            heads = keep[g * group : (g + 1) * group, first + t]  # [group, nb]
            assert listed == torch.nonzero(heads.any(0)).flatten().tolist()
            for j, tile in enumerate(listed):
                bits = int(lists.head_bits[g, t, j])
                assert [bool(bits >> h & 1) for h in range(group)] == heads[:, tile].tolist()


def test_packed_lists_pad_to_the_widest():
    gen = torch.Generator().manual_seed(0)
    a = TilePattern.from_dense_mask(torch.rand(4, 5, 5, generator=gen) < 0.5, 16, 80)
    b = TilePattern.from_dense_mask(torch.ones(4, 9, 9, dtype=torch.bool), 16, 140)
    packed = pack_lists([window_lists(a, 1, 3, 2), window_lists(b, 4, 5, 2)])
    assert packed.kv_indices.shape == (2, 3, 9) and packed.kv_counts.shape == (2, 3)
    assert packed.head_bits.shape == packed.kv_indices.shape
    assert packed.kv_counts[:, 2].tolist() == [9, 9]
    assert packed.head_bits[:, 2].tolist() == [[3] * 9, [3] * 9]
