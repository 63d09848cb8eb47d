"""The staged attention executor (`core.staged`): groups, one call per group, and outputs equal to
each sequence run alone through the plain references (CPU, fp32, no vLLM)."""

import pytest
import torch
from sparsed_vllm.kernels import cached_attention_ref

from sparsed_vllm.core import staged
from sparsed_vllm.core.pattern import (
    TilePattern,
    block_sparse_attention_ref,
    dense_attention_ref,
    num_tiles,
    select_pattern,
)
from sparsed_vllm.core.sparsed import DENSE, SELECT, SPARSE, PatternStore
from sparsed_vllm.core.staged import (
    CACHED_DENSE,
    CACHED_SPARSE,
    AttentionBatch,
    CachedWindow,
    KVWrite,
    SequenceStage,
    staged_attention,
)

HQ, HKV, D, PAGE, LAYER, SCALE = 4, 2, 16, 8, 3, 0.25


def random_pattern(length, tile, gen):
    nb = num_tiles(length, tile)
    keep = torch.rand(HQ, nb, nb, generator=gen) < 0.4
    keep[..., 0] = True
    return TilePattern.from_dense_mask(keep, tile, length)


def make_step(full, windows, seed=0):
    """A step: full sequences `(length, stage, tile)` and cached windows `(rows, start, kv_len,
    stage, tile)`, in the order given. Returns the batch, q/k/v, the KV cache and, per sequence,
    what it should equal."""
    gen = torch.Generator().manual_seed(seed)
    store = PatternStore()
    n_pages = sum(-(-w[2] // PAGE) for w in windows) + 2
    cache = torch.randn(2, n_pages, PAGE, HKV, D, generator=gen)
    perm = torch.randperm(n_pages, generator=gen)
    stages, cached, used = [], [], 0
    for i, (length, stage, tile) in enumerate(full):
        stages.append(
            SequenceStage(stage, (i, 0), gen_length=length // 3, block_size=tile, select=0.4)
        )
        if stage == SPARSE:
            store.put((i, 0), LAYER, random_pattern(length, tile, gen))
    for j, (rows, start, kv_len, stage, tile) in enumerate(windows):
        key = (100 + j, 0)
        n = -(-kv_len // PAGE)
        pages, used = perm[used : used + n], used + n
        sequence_stage = SequenceStage(stage, key, 0, tile, 0.4)
        cached.append(CachedWindow(rows, start, kv_len, pages, sequence_stage))
        if stage == SPARSE:
            store.put(key, LAYER, random_pattern(kv_len, tile, gen))
    n_rows = sum(f[0] for f in full) + sum(w[0] for w in windows)
    q = torch.randn(n_rows, HQ, D, generator=gen)
    k, v = (torch.randn(n_rows, HKV, D, generator=gen) for _ in range(2))
    batch = AttentionBatch.build(
        [f[0] for f in full], torch.device("cpu"), stages, store, SCALE, cached=cached
    )
    return batch, q, k, v, cache


def expected(batch, full, windows, q, k, v, cache):
    """Each sequence alone through the references (the patterns from a select are recomputed)."""
    out, start = [], 0
    for i, (length, stage, _) in enumerate(full):
        qs, ks, vs = q[start : start + length], k[start : start + length], v[start : start + length]
        if stage == SPARSE:
            pattern = batch.patterns.get((i, 0), LAYER)
            out.append(block_sparse_attention_ref(qs, ks, vs, pattern, SCALE))
        else:
            out.append(dense_attention_ref(qs, ks, vs, SCALE))
        start += length
    for j, (rows, pos, kv_len, stage, _) in enumerate(windows):
        window = staged._cu([rows], "cpu")
        pages = [g for g in batch.groups if g.kind in (CACHED_DENSE, CACHED_SPARSE)]
        table = next(g.block_table[g.seqs.index(j)] for g in pages if j in g.seqs)[None]
        pattern = [batch.patterns.get((100 + j, 0), LAYER)] if stage == SPARSE else None
        out.append(
            cached_attention_ref(
                q[start : start + rows],
                cache[0],
                cache[1],
                window,
                torch.tensor([kv_len], dtype=torch.int32),
                table,
                SCALE,
                pattern,
                [pos],
            )
        )
        start += rows
    return torch.cat(out)


FULL = [(40, DENSE, 16), (33, SELECT, 16), (50, SPARSE, 16), (45, SPARSE, 32), (20, DENSE, 16)]
WINDOWS = [(8, 24, 60, DENSE, 16), (8, 40, 70, SPARSE, 16), (5, 30, 37, SPARSE, 16)]


def test_groups_are_one_per_kind_and_tile_in_kind_order():
    batch, *_ = make_step(FULL, WINDOWS)
    got = [(g.kind, g.seqs, g.stages[0].block_size) for g in batch.groups]
    assert got == [
        (DENSE, [0, 4], 16),
        (SELECT, [1], 16),
        (SPARSE, [2], 16),
        (SPARSE, [3], 32),
        (CACHED_DENSE, [0], 16),
        (CACHED_SPARSE, [1, 2], 16),
    ]
    # Contiguous members are a view; the two dense ones around the others are gathered rows.
    dense, select = batch.groups[0], batch.groups[1]
    assert torch.equal(dense.rows, torch.cat([torch.arange(0, 40), torch.arange(168, 188)]))
    assert select.rows == slice(40, 73)
    cached_sparse = batch.groups[-1]
    assert cached_sparse.rows == slice(196, 209) and cached_sparse.q_starts == [40, 30]
    assert cached_sparse.cu_seqlens.tolist() == [0, 8, 13]
    assert cached_sparse.kv_lens.tolist() == [70, 37] and cached_sparse.max_kv_len == 70


@pytest.mark.parametrize("order", ["as given", "reversed"])
def test_every_sequence_equals_itself_alone(order):
    full, windows = (FULL, WINDOWS) if order == "as given" else (FULL[::-1], WINDOWS[::-1])
    batch, q, k, v, cache = make_step(full, windows, seed=1)
    out = staged_attention(LAYER, q, k, v, cache, batch, SCALE, torch.full_like(q, float("nan")))
    assert torch.allclose(out, expected(batch, full, windows, q, k, v, cache), atol=1e-5)


def test_selection_stores_each_sequences_own_pattern():
    full = [(33, SELECT, 16), (70, SELECT, 16), (29, SELECT, 8)]
    batch, q, k, v, cache = make_step(full, [], seed=2)
    staged_attention(LAYER, q, k, v, cache, batch, SCALE, torch.empty_like(q))
    start = 0
    for i, (length, _, tile) in enumerate(full):
        rows = slice(start, start + length)
        want = select_pattern(q[rows], k[rows], length // 3, tile, 0.4, SCALE)
        got = batch.patterns.get((i, 0), LAYER)
        assert torch.equal(got.to_dense_mask(), want.to_dense_mask())
        start += length


def test_one_call_per_group(monkeypatch):
    """Several sequences of every kind cost one call of each kind's op per layer."""
    calls = []
    for name in ("dense", "select", "sparse", "cached_dense", "cached_sparse"):
        op = getattr(staged._ExactOps, name)

        def spy(self, q, *args, _op=op, _name=name):
            calls.append((_name, q.shape[0]))
            return _op(self, q, *args)

        monkeypatch.setattr(staged._ExactOps, name, spy)
    full = [(40, DENSE, 16), (21, DENSE, 16), (33, SELECT, 16), (20, SELECT, 16)]
    full += [(50, SPARSE, 16), (19, SPARSE, 16)]
    windows = [(8, 24, 60, DENSE, 16), (3, 2, 9, DENSE, 16)]
    windows += [(8, 40, 70, SPARSE, 16), (5, 30, 37, SPARSE, 16)]
    batch, q, k, v, cache = make_step(full, windows, seed=3)
    staged_attention(LAYER, q, k, v, cache, batch, SCALE, torch.empty_like(q))
    assert calls == [
        ("dense", 61),
        ("select", 53),
        ("sparse", 69),
        ("cached_dense", 11),
        ("cached_sparse", 13),
    ]


def test_kv_write_lands_before_the_windows_read():
    """A window's own fresh keys are read back from the cache in the same call."""
    batch, q, k, v, cache = make_step([], [(8, 16, 30, DENSE, 16)], seed=4)
    group = batch.groups[0]
    positions = torch.arange(16, 24)
    pages = group.block_table[0].long()
    slots = pages[positions // PAGE] * PAGE + positions % PAGE
    batch.kv_write = KVWrite(rows=None, slots=slots)
    before = cache.clone()
    out = staged_attention(LAYER, q, k, v, cache, batch, SCALE, torch.empty_like(q))
    assert torch.equal(cache[0].flatten(0, 1)[slots], k)
    assert not torch.equal(before, cache)
    want = cached_attention_ref(
        q, cache[0], cache[1], group.cu_seqlens, group.kv_lens, group.block_table, SCALE
    )
    assert torch.allclose(out, want)
