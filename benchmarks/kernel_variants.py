"""Kernel variants tried for the sparse-attention and tile-mass kernels (a record, not shipped).

Standalone simplified kernels (whole tiles only, one sequence, tile 128) timed against the shipped
ones and FlexAttention in one run; outputs checked against the shipped kernels:
- `PIPE`: the next block's Q K^T is issued before the current block's softmax (or exp2-sum), so
  the tensor cores can work under the exponentials (FA3-style overlap, written by hand);
- `POLY`: half of each block's exp2 evaluated by a polynomial on the FMA units instead of the
  special-function unit (the FlashAttention-4 idea), degree 3/4/5 (relative error 8e-5 / 3e-6 /
  8e-8 on [-0.5, 0.5]);
- `m64`: `BLOCK_M` 64 with 4 warps, small enough for two programs per SM.
The tile-mass `PIPE` variant won (15-19%) and is now the shipped `_tile_mass_kernel` loop; the
rest lost (benchmarks/RESULTS.md, "Kernel variants").

    python benchmarks/kernel_variants.py --out variants.json
"""

import argparse
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl
from sparsed_vllm.kernels import dense_attention, fused_tile_importance, sparse_attention
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import flex_block_mask, random_pattern, rel_rms  # noqa: E402

from sparsed_vllm.core.pattern import pack_patterns  # noqa: E402

LOG2E = math.log2(math.e)


@triton.jit
def _exp2_poly(x, DEG: tl.constexpr):
    x = tl.maximum(x, -125.0)
    t = x + 12582912.0
    j = t - 12582912.0
    f = x - j
    if DEG == 3:
        p = 0.055088683807511155 * f + 0.24260405145947916
        p = p * f + 0.6932762416819607
        p = p * f + 0.9999289403695112
    elif DEG == 4:
        p = 0.009560510206479134 * f + 0.055917039174867955
        p = p * f + 0.2402498110953733
        p = p * f + 0.693121967696061
        p = p * f + 0.9999991908565828
    else:
        p = 0.0013266970386325919 * f + 0.009675459745517631
        p = p * f + 0.05550742616002543
        p = p * f + 0.24022121753561676
        p = p * f + 0.6931469491610631
        p = p * f + 1.0000000710296983
    e = t.to(tl.int32, bitcast=True) << 23
    return (p.to(tl.int32, bitcast=True) + e).to(tl.float32, bitcast=True)


@triton.jit
def _softmax_pv(b_s, b_v, b_m, b_l, b_acc, qk_scale):
    b_mn = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
    b_p = tl.math.exp2(b_s * qk_scale - b_mn[:, None])
    b_alpha = tl.math.exp2(b_m - b_mn)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None])
    return b_mn, b_l, b_acc


@triton.jit
def _sp_kernel(
    q,
    k,
    v,
    o,
    kv_indices,
    kv_counts,
    qk_scale,
    stride_t,
    stride_ih,
    stride_it,
    stride_ch,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PIPE: tl.constexpr,
    POLY: tl.constexpr,
    DEG: tl.constexpr,
):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    i_t = i_m // (TILE // BLOCK_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D)
    b_q = tl.load(q + o_m[:, None] * stride_t + i_h * D + o_d[None, :])
    p_k = k + (i_h // GROUP) * D + o_d[None, :]
    p_v = v + (i_h // GROUP) * D + o_d[None, :]
    n = tl.load(kv_counts + i_h * stride_ch + i_t)
    p_idx = kv_indices + i_h * stride_ih + i_t * stride_it
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if POLY:
        HALF: tl.constexpr = TILE // 2
        o_h = tl.arange(0, HALF)
        for i in range(n):
            kv = tl.load(p_idx + i) * TILE + o_h
            b_k1 = tl.load(p_k + kv[:, None] * stride_t)
            b_k2 = tl.load(p_k + (kv + HALF)[:, None] * stride_t)
            b_s1 = tl.dot(b_q, tl.trans(b_k1))
            b_s2 = tl.dot(b_q, tl.trans(b_k2))
            b_mn = tl.maximum(b_m, tl.maximum(tl.max(b_s1, 1), tl.max(b_s2, 1)) * qk_scale)
            b_p1 = tl.math.exp2(b_s1 * qk_scale - b_mn[:, None])
            b_p2 = _exp2_poly(b_s2 * qk_scale - b_mn[:, None], DEG)
            b_alpha = tl.math.exp2(b_m - b_mn)
            b_l = b_l * b_alpha + tl.sum(b_p1, 1) + tl.sum(b_p2, 1)
            b_v1 = tl.load(p_v + kv[:, None] * stride_t)
            b_v2 = tl.load(p_v + (kv + HALF)[:, None] * stride_t)
            b_acc = tl.dot(b_p1.to(b_v1.dtype), b_v1, b_acc * b_alpha[:, None])
            b_acc = tl.dot(b_p2.to(b_v2.dtype), b_v2, b_acc)
            b_m = b_mn
    elif PIPE:
        o_n = tl.arange(0, TILE)
        kv = tl.load(p_idx) * TILE + o_n
        b_s = tl.dot(b_q, tl.trans(tl.load(p_k + kv[:, None] * stride_t)))
        for i in range(1, n):
            kvn = tl.load(p_idx + i) * TILE + o_n
            b_sn = tl.dot(b_q, tl.trans(tl.load(p_k + kvn[:, None] * stride_t)))
            b_v = tl.load(p_v + kv[:, None] * stride_t)
            b_m, b_l, b_acc = _softmax_pv(b_s, b_v, b_m, b_l, b_acc, qk_scale)
            b_s = b_sn
            kv = kvn
        b_v = tl.load(p_v + kv[:, None] * stride_t)
        b_m, b_l, b_acc = _softmax_pv(b_s, b_v, b_m, b_l, b_acc, qk_scale)
    else:
        o_n = tl.arange(0, TILE)
        for i in range(n):
            kv = tl.load(p_idx + i) * TILE + o_n
            b_s = tl.dot(b_q, tl.trans(tl.load(p_k + kv[:, None] * stride_t)))
            b_v = tl.load(p_v + kv[:, None] * stride_t)
            b_m, b_l, b_acc = _softmax_pv(b_s, b_v, b_m, b_l, b_acc, qk_scale)
    b_o = b_acc / b_l[:, None]
    tl.store(o + o_m[:, None] * stride_t + i_h * D + o_d[None, :], b_o.to(o.dtype.element_ty))


def sp_variant(q, k, v, packed, scale, pipe, poly, deg=3, block_m=128, warps=8, stages=3):
    out = torch.empty_like(q)
    tile = packed.block_size
    n_tiles = packed.kv_counts.shape[1]
    grid = (n_tiles * (tile // block_m), q.shape[1])
    _sp_kernel[grid](
        q,
        k,
        v,
        out,
        packed.kv_indices,
        packed.kv_counts,
        scale * LOG2E,
        q.stride(0),
        packed.kv_indices.stride(0),
        packed.kv_indices.stride(1),
        packed.kv_counts.stride(0),
        GROUP=q.shape[1] // k.shape[1],
        D=q.shape[2],
        TILE=tile,
        BLOCK_M=block_m,
        PIPE=pipe,
        POLY=poly,
        DEG=deg,
        num_warps=warps,
        num_stages=stages,
    )
    return out


@triton.jit
def _mass_of(b_s, b_lse, POLY: tl.constexpr, DEG: tl.constexpr):
    if POLY:
        return tl.sum(tl.sum(_exp2_poly(b_s - b_lse[:, None], DEG), 1), 0)
    return tl.sum(tl.sum(tl.math.exp2(b_s - b_lse[:, None]), 1), 0)


@triton.jit
def _mass_kernel(
    q,
    k,
    lse2,
    mass,
    qk_scale,
    inv_area,
    nb,
    stride_t,
    stride_lh,
    stride_mh,
    stride_mt,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    TILE: tl.constexpr,
    PIPE: tl.constexpr,
    POLY: tl.constexpr,
    DEG: tl.constexpr,
):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_m = i_t * TILE + tl.arange(0, TILE)
    o_d = tl.arange(0, D)
    b_q = tl.load(q + o_m[:, None] * stride_t + i_h * D + o_d[None, :])
    b_lse = tl.load(lse2 + i_h * stride_lh + o_m)
    p_k = k + (i_h // GROUP) * D + o_d[None, :]
    p_mass = mass + i_h * stride_mh + i_t * stride_mt
    HALF: tl.constexpr = TILE // 2
    o_h = tl.arange(0, HALF)
    o_n = tl.arange(0, TILE)
    if PIPE:
        if POLY:
            b_s1 = tl.dot(b_q, tl.trans(tl.load(p_k + o_h[:, None] * stride_t))) * qk_scale
            b_s2 = tl.dot(b_q, tl.trans(tl.load(p_k + (HALF + o_h)[:, None] * stride_t))) * qk_scale
            for i in range(1, nb):
                kv = i * TILE + o_h
                b_n1 = tl.dot(b_q, tl.trans(tl.load(p_k + kv[:, None] * stride_t))) * qk_scale
                b_n2 = tl.dot(b_q, tl.trans(tl.load(p_k + (kv + HALF)[:, None] * stride_t)))
                m = _mass_of(b_s1, b_lse, False, DEG) + _mass_of(b_s2, b_lse, True, DEG)
                tl.store(p_mass + i - 1, m * inv_area)
                b_s1 = b_n1
                b_s2 = b_n2 * qk_scale
            m = _mass_of(b_s1, b_lse, False, DEG) + _mass_of(b_s2, b_lse, True, DEG)
            tl.store(p_mass + nb - 1, m * inv_area)
        else:
            b_s = tl.dot(b_q, tl.trans(tl.load(p_k + o_n[:, None] * stride_t))) * qk_scale
            for i in range(1, nb):
                b_sn = tl.dot(b_q, tl.trans(tl.load(p_k + (i * TILE + o_n)[:, None] * stride_t)))
                tl.store(p_mass + i - 1, _mass_of(b_s, b_lse, False, DEG) * inv_area)
                b_s = b_sn * qk_scale
            tl.store(p_mass + nb - 1, _mass_of(b_s, b_lse, False, DEG) * inv_area)
    elif POLY:
        for i in range(nb):
            kv = i * TILE + o_h
            b_s1 = tl.dot(b_q, tl.trans(tl.load(p_k + kv[:, None] * stride_t))) * qk_scale
            b_s2 = tl.dot(b_q, tl.trans(tl.load(p_k + (kv + HALF)[:, None] * stride_t))) * qk_scale
            m = _mass_of(b_s1, b_lse, False, DEG) + _mass_of(b_s2, b_lse, True, DEG)
            tl.store(p_mass + i, m * inv_area)
    else:
        for i in range(nb):
            b_s = tl.dot(b_q, tl.trans(tl.load(p_k + (i * TILE + o_n)[:, None] * stride_t)))
            tl.store(p_mass + i, _mass_of(b_s * qk_scale, b_lse, False, DEG) * inv_area)


def mass_variant(q, k, lse2, tile, scale, pipe, poly, deg=3, warps=8, stages=2):
    n_heads, seq = q.shape[1], q.shape[0]
    nb = seq // tile
    mass = torch.empty(n_heads, nb, nb, dtype=torch.float32, device=q.device)
    _mass_kernel[(nb, n_heads)](
        q,
        k,
        lse2,
        mass,
        scale * LOG2E,
        1.0 / tile**2,
        nb,
        q.stride(0),
        lse2.stride(0),
        mass.stride(0),
        mass.stride(1),
        GROUP=n_heads // k.shape[1],
        D=q.shape[2],
        TILE=tile,
        PIPE=pipe,
        POLY=poly,
        DEG=deg,
        num_warps=warps,
        num_stages=stages,
    )
    return mass


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


SPARSE_VARIANTS = {
    "plain": {"pipe": False, "poly": False},
    "pipe": {"pipe": True, "poly": False},
    "pipe_s2": {"pipe": True, "poly": False, "stages": 2},
    "poly3": {"pipe": False, "poly": True, "deg": 3},
    "poly3_s2": {"pipe": False, "poly": True, "deg": 3, "stages": 2},
    "m64_w4_s2": {"pipe": False, "poly": False, "block_m": 64, "warps": 4, "stages": 2},
    "m64_w4_s3": {"pipe": False, "poly": False, "block_m": 64, "warps": 4, "stages": 3},
}
MASS_VARIANTS = {
    "plain": {"pipe": False, "poly": False},
    "pipe": {"pipe": True, "poly": False},
    "pipe_s3": {"pipe": True, "poly": False, "stages": 3},
    "poly3": {"pipe": False, "poly": True, "deg": 3},
    "poly4": {"pipe": False, "poly": True, "deg": 4},
    "poly5": {"pipe": False, "poly": True, "deg": 5},
    "pipe_poly4": {"pipe": True, "poly": True, "deg": 4},
    "poly4_s3": {"pipe": False, "poly": True, "deg": 4, "stages": 3},
}


def sparse_row(q, k, v, select, flex):
    """Shipped kernel, Flex and each variant at one `select` (ms, error vs shipped, ratios)."""
    seq, heads, d = q.shape
    scale = d**-0.5
    pattern = random_pattern(heads, seq, 128, select, q.device)
    packed = pack_patterns([pattern])
    flops = 4 * d * int(pattern.kv_counts.sum()) * 128 * 128
    cu = torch.tensor([0, seq], dtype=torch.int32, device=q.device)
    ref = sparse_attention(q, k, v, cu, packed, scale)
    row = {"base": bench(lambda: sparse_attention(q, k, v, cu, packed, scale))}
    bm = flex_block_mask(pattern)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    row["flex"] = bench(lambda: flex(q4, k4, v4, block_mask=bm, scale=scale))
    for name, kw in SPARSE_VARIANTS.items():
        try:
            row[name + "_err"] = rel_rms(ref, sp_variant(q, k, v, packed, scale, **kw))
            row[name] = bench(lambda kw=kw: sp_variant(q, k, v, packed, scale, **kw))
        except Exception as e:  # noqa: BLE001  (a variant that does not compile is a result)
            row[name] = repr(e)[:300]
    for key, val in list(row.items()):
        if isinstance(val, float) and not key.endswith("_err"):
            row[key + "_tflops"] = flops / val / 1e9
            row[key + "_flex_ratio"] = row["flex"] / val
    return row


def mass_row(q, k, v):
    """Tile-mass pass with the dense LSE given: shipped kernel vs each variant."""
    seq, _, d = q.shape
    scale = d**-0.5
    cu = torch.tensor([0, seq], dtype=torch.int32, device=q.device)
    _, lse = dense_attention(q, k, v, cu, seq, scale, return_lse=True)
    lse2 = (lse.float() * LOG2E).contiguous()
    base = fused_tile_importance(q, k, cu, [0], 128, scale, lse=lse)[0]
    n_top = int(0.3 * base.shape[-1])
    base_top = base.topk(n_top, -1).indices.sort(-1).values
    row = {"base_full": bench(lambda: fused_tile_importance(q, k, cu, [0], 128, scale, lse=lse))}
    for name, kw in MASS_VARIANTS.items():
        try:
            m = mass_variant(q, k, lse2, 128, scale, **kw)
            row[name + "_maxrel"] = float(((m - base) / base).abs().max())
            same = m.topk(n_top, -1).indices.sort(-1).values == base_top
            row[name + "_topk_same_rows"] = float(same.all(-1).float().mean())
            row[name] = bench(lambda kw=kw: mass_variant(q, k, lse2, 128, scale, **kw))
        except Exception as e:  # noqa: BLE001
            row[name] = repr(e)[:300]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="32768,65536")
    ap.add_argument("--out", default="variants.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    flex = torch.compile(flex_attention)
    res = {"device": torch.cuda.get_device_name()}
    for seq in map(int, args.lens.split(",")):
        shape = (seq, 32, 128)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for select in (0.1, 0.3):
            res[f"sparse_{seq}_{select}"] = row = sparse_row(q, k, v, select, flex)
            print(seq, select, json.dumps({a: b for a, b in row.items() if "tflops" not in a}))
        res[f"mass_{seq}"] = row = mass_row(q, k, v)
        print(seq, "mass", json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
