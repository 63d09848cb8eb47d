"""Fused (Triton) SparseD selection against the PyTorch reference (GPU).

Kept sets must match exactly, except where the reference's own importance values make the choice a
genuine near-tie: a tile may differ only if its reference importance lies within `TIE_RTOL` of the
k-th largest value of its row (the rank boundary), where fp32 summation order can flip the order.
"""

import pytest
import torch
from sparsed_vllm.kernels import dense_attention, select_pattern_ref, tile_importance_ref

from sparsed_vllm.core.pattern import (
    default_scale,
    generation_start_tile,
    llada_reference_scale,
    num_kept_tiles,
)

pytestmark = pytest.mark.gpu

TIE_RTOL = 1e-4


def make_qk(lens, n_heads, n_kv, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens), n_heads, head_dim, generator=gen).to("cuda", dtype)
    k = torch.randn(sum(lens), n_kv, head_dim, generator=gen).to("cuda", dtype)
    cu = torch.tensor([0, *lens]).cumsum(0).to(device="cuda", dtype=torch.int32)
    return q, k, cu


CASES = [
    # (lens, gen_lengths, Hq, Hkv, D, dtype, tile, select)
    ([1000], [256], 4, 4, 128, torch.bfloat16, 128, 0.3),
    ([37, 513, 900], [10, 100, 0], 4, 2, 64, torch.float16, 64, 0.3),
    ([300, 77], [1000, 30], 2, 1, 128, torch.bfloat16, 32, 0.5),
    ([1500], [200], 8, 2, 128, torch.float16, 128, 0.1),
    ([100], [50], 2, 2, 64, torch.bfloat16, 128, 0.3),
]


def _case_id(c):
    lens, gens, hq, hkv, d, dtype, tile, sel = c
    return (
        f"L{'+'.join(map(str, lens))}-gen{'+'.join(map(str, gens))}-H{hq}-KV{hkv}-D{d}"
        f"-{str(dtype)[6:]}-T{tile}-s{sel}"
    )


def assert_same_selection(fused, ref, full_ref, gen_ref, lens, gens, tile, select):
    """Equal kept sets per sequence, mismatches allowed only at near-ties of the reference."""
    for b, (got, want) in enumerate(zip(fused.unpack(), ref.unpack(), strict=True)):
        m_got, m_want = got.to_dense_mask(), want.to_dense_mask()
        diff = m_got != m_want
        if not diff.any():
            continue
        nb = m_want.shape[-1]
        g = generation_start_tile(lens[b], gens[b], tile)
        kth_all = full_ref[b].topk(num_kept_tiles(nb, select), -1).values[..., -1:]
        kth_gen = gen_ref[b].topk(num_kept_tiles(nb - g, select), -1).values[..., -1:]
        near_all = (full_ref[b] - kth_all).abs() <= TIE_RTOL * kth_all
        near_gen = (gen_ref[b] - kth_gen).abs() <= TIE_RTOL * kth_gen
        near = torch.cat([near_all[..., :g], near_gen], dim=-1)
        assert bool(near[diff].all()), f"sequence {b}: {int(diff.sum())} tiles differ, not ties"


def assert_same_mass(assert_close, full_ref, gen_ref, mass, mass_gen, offsets, gen_tiles, tol):
    """The fused tile masses of each sequence (packed along query tiles, padded key tiles)
    against the reference's per-sequence ones."""
    bounds = offsets.tolist()
    for b in range(len(full_ref)):
        rows, nb, g = slice(bounds[b], bounds[b + 1]), full_ref[b].shape[-1], int(gen_tiles[b])
        assert_close(f"mass[{b}]", full_ref[b], mass[:, rows, :nb], tol)
        assert_close(f"mass_gen[{b}]", gen_ref[b], mass_gen[:, rows, g:nb], tol)


@pytest.mark.parametrize("scale_kind", ["head_dim", "llada"])
@pytest.mark.parametrize(
    "lens,gens,n_heads,n_kv,head_dim,dtype,tile,select", CASES, ids=[_case_id(c) for c in CASES]
)
def test_fused_selection(
    lens, gens, n_heads, n_kv, head_dim, dtype, tile, select, scale_kind, assert_close
):
    from sparsed_vllm.kernels import fused_select_pattern, fused_tile_importance

    q, k, cu = make_qk(lens, n_heads, n_kv, head_dim, dtype, seed=sum(lens))
    scale = default_scale(head_dim) if scale_kind == "head_dim" else llada_reference_scale(32)
    full_ref, gen_ref = tile_importance_ref(q, k, cu, gens, tile, scale)
    mass, mass_gen, offsets, gen_tiles = fused_tile_importance(q, k, cu, gens, tile, scale)
    assert_same_mass(assert_close, full_ref, gen_ref, mass, mass_gen, offsets, gen_tiles, 1e-4)

    fused = fused_select_pattern(q, k, cu, gens, tile, select, scale)
    ref = select_pattern_ref(q, k, cu, gens, tile, select, scale)
    assert_same_selection(fused, ref, full_ref, gen_ref, lens, gens, tile, select)


def test_fused_selection_reuses_dense_lse(assert_close):
    """With the LSE of the dense attention of the same step, only generation keys are rescanned."""
    from sparsed_vllm.kernels import fused_tile_importance

    lens, gens = [700, 1100], [128, 300]
    q, k, cu = make_qk(lens, 4, 2, 128, torch.bfloat16, seed=11)
    scale = default_scale(128)
    _, lse = dense_attention(q, k, k, cu, max(lens), scale, return_lse=True)
    own = fused_tile_importance(q, k, cu, gens, 128, scale)
    reused = fused_tile_importance(q, k, cu, gens, 128, scale, lse=lse)
    bounds = own[2].tolist()
    for b in range(len(lens)):
        rows, nb = slice(bounds[b], bounds[b + 1]), bounds[b + 1] - bounds[b]
        assert_close(f"mass[{b}]", own[0][:, rows, :nb], reused[0][:, rows, :nb], 1e-4)


@pytest.mark.parametrize(
    "config",
    [{"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, {"BLOCK_N": 32, "num_warps": 4}],
    ids=["N64", "N32"],
)
def test_tile_mass_sub_blocks(config, assert_close):
    """Key tiles summed in several BLOCK_N blocks, partial last tiles included."""
    from sparsed_vllm.kernels import fused_tile_importance

    lens, gens = [300, 77, 1000], [10, 30, 200]
    q, k, cu = make_qk(lens, 4, 2, 128, torch.bfloat16, seed=13)
    full_ref, gen_ref = tile_importance_ref(q, k, cu, gens, 128, 0.1)
    mass, mass_gen, offsets, gen_tiles = fused_tile_importance(
        q, k, cu, gens, 128, 0.1, None, config
    )
    assert_same_mass(assert_close, full_ref, gen_ref, mass, mass_gen, offsets, gen_tiles, 1e-4)
