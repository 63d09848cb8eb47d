"""The staged executor on its kernel path (GPU, half precision) against its exact path (fp32 on
the CPU) on one mixed step: every kind of work, several sequences each, two tile sizes."""

import pytest
import torch

from sparsed_vllm.core.pattern import TilePattern, num_tiles
from sparsed_vllm.core.sparsed import DENSE, SELECT, SPARSE, PatternStore
from sparsed_vllm.core.staged import (
    AttentionBatch,
    CachedWindow,
    KVWrite,
    SequenceStage,
    staged_attention,
)

HQ, HKV, D, PAGE, LAYER = 8, 2, 64, 16, 0
FULL = [(300, DENSE, 64), (257, SELECT, 64), (700, SPARSE, 64), (190, SELECT, 64)]
FULL += [(513, SPARSE, 32), (64, DENSE, 64), (1000, SPARSE, 64)]
WINDOWS = [(32, 200, 400, DENSE, 64), (32, 480, 700, SPARSE, 64), (7, 250, 257, SPARSE, 32)]
WINDOWS += [(32, 1000, 2100, SPARSE, 64), (1, 99, 100, DENSE, 64)]


def build(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    patterns = {}
    stages = []
    for i, (length, stage, tile) in enumerate(FULL):
        stages.append(SequenceStage(stage, (i, 0), length // 4, tile, 0.3))
        if stage == SPARSE:
            patterns[(i, 0)] = _pattern(length, tile, gen)
    n_pages = sum(-(-w[2] // PAGE) for w in WINDOWS)
    perm = torch.randperm(n_pages, generator=gen)
    windows, used = [], 0
    for j, (rows, start, kv_len, stage, tile) in enumerate(WINDOWS):
        n = -(-kv_len // PAGE)
        key = (50 + j, 0)
        step = SequenceStage(stage, key, 0, tile, 0.3)
        windows.append(CachedWindow(rows, start, kv_len, perm[used : used + n], step))
        used += n
        if stage == SPARSE:
            patterns[key] = _pattern(kv_len, tile, gen)
    n_rows = sum(f[0] for f in FULL) + sum(w[0] for w in WINDOWS)
    q = torch.randn(n_rows, HQ, D, generator=gen)
    k, v = (torch.randn(n_rows, HKV, D, generator=gen) for _ in range(2))
    cache = torch.randn(2, n_pages, PAGE, HKV, D, generator=gen)
    # The windows' fresh keys go to the cache first, as at a cached step.
    rows, slots, offset = [], [], sum(f[0] for f in FULL)
    for w in windows:
        position = torch.arange(w.start, w.start + w.rows)
        slots.append(w.pages[position // PAGE] * PAGE + position % PAGE)
        rows.append(torch.arange(offset, offset + w.rows))
        offset += w.rows
    store = PatternStore()
    for key, p in patterns.items():
        store.put(
            key,
            LAYER,
            TilePattern(p.kv_indices.to(device), p.kv_counts.to(device), p.block_size, p.seq_len),
        )
    write = KVWrite(torch.cat(rows).to(device), torch.cat(slots).to(device))
    batch = AttentionBatch.build(
        [f[0] for f in FULL], torch.device(device), stages, store, D**-0.5, windows, write
    )
    tensors = [t.to(device, dtype) for t in (q, k, v, cache)]
    return batch, tensors


def _pattern(length, tile, gen):
    nb = num_tiles(length, tile)
    keep = torch.rand(HQ, nb, nb, generator=gen) < 0.3
    keep[..., 0] = True
    return TilePattern.from_dense_mask(keep, tile, length)


@pytest.mark.gpu
@pytest.mark.parametrize("cached_kernel", ["triton", "fa3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_path_equals_exact_path(dtype, cached_kernel, assert_close):
    from sparsed_vllm.kernels.cached import fa3

    if cached_kernel == "fa3" and not fa3.fa3_available():
        pytest.skip("vLLM's FA3 build is not usable here")
    batch, (q, k, v, cache) = build("cuda", dtype)
    batch.cached_kernel = cached_kernel
    out = staged_attention(LAYER, q, k, v, cache, batch, D**-0.5, torch.empty_like(q))
    exact, (qe, ke, ve, ce) = build("cpu", torch.float32)
    want = staged_attention(LAYER, qe, ke, ve, ce, exact, D**-0.5, torch.empty_like(qe))
    assert_close("staged", want, out.cpu(), 1e-2)
    # Both selected a pattern for every select sequence at this layer.
    for i, (_, stage, _) in enumerate(FULL):
        if stage == SELECT:
            got, ref = batch.patterns.get((i, 0), LAYER), exact.patterns.get((i, 0), LAYER)
            assert got.kv_indices.shape[:2] == ref.kv_indices.shape[:2]
