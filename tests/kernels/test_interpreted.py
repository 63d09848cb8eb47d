"""Every Triton kernel against its PyTorch reference on the CPU, through Triton's interpreter.

CI has no GPU: this is how it runs the kernels themselves (small shapes, fp16, since the
interpreter's bfloat16 is not exact). `scripts/run_tests.sh` runs this file in a process of its
own with `TRITON_INTERPRET=1` and a Triton kept outside the virtual environment (vLLM's CPU build
must not see it); elsewhere it is skipped. The GPU tests beside it cover the real shapes.
"""

import importlib.util
import os

import pytest
import torch
from sparsed_vllm.kernels import (
    cached_attention_ref,
    select_pattern_ref,
    sparse_attention_ref,
    tile_importance_ref,
)
from test_cached_attention import make_paged
from test_cached_sparse_attention import random_patterns
from test_pattern_selection import assert_same_mass, assert_same_selection
from test_sparse_attention import random_pattern

from sparsed_vllm.core.pattern import TilePattern, default_scale, pack_patterns

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
    reason="runs the kernels through Triton's interpreter (TRITON_INTERPRET=1, triton importable)",
)

CPU, HALF = "cpu", torch.float16


def qkv(lens, n_heads, n_kv, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lens), h, head_dim, generator=gen) for h in (n_heads, n_kv, n_kv))
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    return q.to(HALF), k.to(HALF), v.to(HALF), cu, gen


@pytest.mark.parametrize(
    "lens,n_heads,n_kv,tile,select",
    [([37, 130], 4, 2, 32, 0.3), ([70], 2, 1, 64, 0.5), ([129, 5], 2, 2, 16, 0.1)],
)
def test_sparse_attention(lens, n_heads, n_kv, tile, select, assert_close):
    from sparsed_vllm.kernels import sparse_attention

    q, k, v, cu, gen = qkv(lens, n_heads, n_kv, 64, sum(lens))
    pattern = pack_patterns([random_pattern(n_heads, n, tile, select, gen) for n in lens])
    scale = default_scale(64)
    out = sparse_attention(q, k, v, cu, pattern, scale)
    assert_close("sparse", sparse_attention_ref(q, k, v, cu, pattern, scale), out, 5e-3)


def test_sparse_attention_all_tiles_kept_is_dense(assert_close):
    from sparsed_vllm.kernels import dense_attention, sparse_attention

    lens = [45, 100]
    q, k, v, cu, _ = qkv(lens, 4, 2, 64, 1)
    full = pack_patterns([TilePattern.full(4, n, 32) for n in lens])
    want = dense_attention(q, k, v, cu, max(lens), 0.125, backend="math")
    assert_close("all-kept", want, sparse_attention(q, k, v, cu, full, 0.125), 5e-3)


@pytest.mark.parametrize("lens,gens,tile", [([100, 37], [40, 10], 32), ([130], [0], 16)])
def test_fused_selection(lens, gens, tile, assert_close):
    from sparsed_vllm.kernels import fused_select_pattern, fused_tile_importance

    q, k, _, cu, _ = qkv(lens, 2, 1, 64, 3)
    scale = default_scale(64)
    full_ref, gen_ref = tile_importance_ref(q, k, cu, gens, tile, scale)
    mass, mass_gen, offsets, gen_tiles = fused_tile_importance(q, k, cu, gens, tile, scale)
    assert_same_mass(assert_close, full_ref, gen_ref, mass, mass_gen, offsets, gen_tiles, 1e-3)
    fused = fused_select_pattern(q, k, cu, gens, tile, 0.3, scale)
    ref = select_pattern_ref(q, k, cu, gens, tile, 0.3, scale)
    assert_same_selection(fused, ref, full_ref, gen_ref, lens, gens, tile, 0.3)


@pytest.mark.parametrize("config", [None, {"num_splits": 3}, {"PACK_GQA": False}])
def test_cached_attention(config, assert_close):
    from sparsed_vllm.kernels import cached_attention

    q, kc, vc, cu, lens, table, _, _ = make_paged(
        [5, 32, 0], [300, 1000, 7], 8, 2, 64, 64, HALF, CPU, seed=2
    )
    want = cached_attention_ref(q, kc, vc, cu, lens, table, 0.125)
    out = cached_attention(q, kc, vc, cu, lens, table, 0.125, config=config)
    assert_close("cached", want, out, 5e-3)


@pytest.mark.parametrize(
    "n_heads,n_kv,config", [(4, 4, None), (8, 2, None), (7, 1, {"num_splits": 4, "BLOCK_M": 16})]
)
def test_cached_sparse_attention(n_heads, n_kv, config, assert_close):
    """MHA and GQA head groups, a window straddling two query tiles, a partial last tile."""
    from sparsed_vllm.kernels import cached_sparse_attention

    q_lens, kv_lens, starts = [32, 3], [333, 100], [50, 97]
    q, kc, vc, cu, lens, table, _, _ = make_paged(
        q_lens, kv_lens, n_heads, n_kv, 64, 32, HALF, CPU, seed=5
    )
    patterns = random_patterns(kv_lens, n_heads, 64, seed=n_heads, device=CPU)
    want = cached_attention_ref(q, kc, vc, cu, lens, table, 0.125, patterns, starts)
    out = cached_sparse_attention(
        q, kc, vc, cu, lens, table, 0.125, patterns, starts, q_lens, config=config
    )
    assert_close("cached-sparse", want, out, 5e-3)
