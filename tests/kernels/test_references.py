"""CPU checks of the kernel package: imports without Triton, references and the dense fallback."""

import subprocess
import sys

import torch
from sparsed_vllm.kernels import (
    dense_attention,
    select_pattern_ref,
    sparse_attention_ref,
    tile_importance_ref,
)

from sparsed_vllm.core.pattern import TilePattern, dense_attention_ref, pack_patterns


def test_import_does_not_load_triton():
    code = "import sys, sparsed_vllm.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _batch(lens, n_heads, n_kv, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, n_heads, head_dim, generator=gen)
    k = torch.randn(total, n_kv, head_dim, generator=gen)
    v = torch.randn(total, n_kv, head_dim, generator=gen)
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    return q, k, v, cu


def test_sparse_ref_full_pattern_is_dense(assert_close):
    q, k, v, cu = _batch([33, 100], 4, 2, 16)
    pattern = pack_patterns([TilePattern.full(4, n, 32) for n in (33, 100)])
    out = sparse_attention_ref(q, k, v, cu, pattern, 0.25)
    want = torch.cat(
        [dense_attention_ref(q[s:e], k[s:e], v[s:e], 0.25) for s, e in ((0, 33), (33, 133))]
    )
    assert_close("sparse_ref", want, out, 1e-6)


def test_dense_math_backend_and_lse(assert_close):
    q, k, v, cu = _batch([33, 100], 4, 2, 16)
    out, lse = dense_attention(q, k, v, cu, 100, 0.25, return_lse=True)
    want = dense_attention_ref(q[33:], k[33:], v[33:], 0.25)
    assert_close("dense", want, out[33:], 1e-6)
    scores = torch.einsum("lhd,nhd->hln", q[:33], k[:33].repeat_interleave(2, 1)) * 0.25
    assert_close("lse", scores.logsumexp(-1), lse[:, :33], 1e-6)


def test_select_ref_batches_sequences():
    q, k, _, cu = _batch([70, 40], 2, 1, 16)
    packed = select_pattern_ref(q, k, cu, [20, 5], block_size=16, select=0.3, scale=0.25)
    assert packed.q_tile_offsets.tolist() == [0, 5, 8]
    full, gen = tile_importance_ref(q, k, cu, [20, 5], block_size=16, scale=0.25)
    assert full[0].shape == (2, 5, 5) and gen[0].shape == (2, 5, 1) and gen[1].shape == (2, 3, 1)
