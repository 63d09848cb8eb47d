"""Attention-level benchmark: SparseD block-sparse kernel vs FlexAttention vs dense, and selection.

LLaDA-8B attention shape by default (32 heads x 128, bf16, one sequence). For each length L:
- dense: SDPA FlashAttention-2, SDPA cuDNN, FA2 varlen (PyTorch's bundled op), `dense_attention`;
- selection: `fused_select_pattern` with its own statistics pass and reusing the dense LSE;
- sparse, per `select`: our Triton kernel vs `torch.compile(flex_attention)` on the same pattern
  as a `BlockMask` (kept tiles passed as full blocks, the fastest Flex configuration).
Patterns are random top-k per (head, query tile) with `k = max(1, int(nb * select) + 1)`.

    python benchmarks/bench_attention.py --lens 8192,16384,32768,65536 --out results.json
"""

import argparse
import datetime
import json
import math

import torch
import torch.nn.functional as F
import triton
from sparsed_vllm.kernels import (
    dense_attention,
    dense_backends,
    fused_select_pattern,
    fused_tile_importance,
    sparse_attention,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from tqdm import tqdm

from sparsed_vllm.core.pattern import TilePattern, num_kept_tiles, num_tiles, pack_patterns

_TMA = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True}
SWEEP = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    _TMA,
    {**_TMA, "num_stages": 2},
    {**_TMA, "WARP_SPEC": True},
]
MASS_SWEEP = [
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
]


def bench_ms(fn, rep_ms: int = 600) -> float:
    """Median milliseconds per call (CUDA events via do_bench, after warm-up)."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=100, rep=rep_ms, return_mode="median")


def random_pattern(n_heads, seq_len, block_size, select, device):
    nb = num_tiles(seq_len, block_size)
    scores = torch.rand(n_heads, nb, nb, device=device)
    kept = scores.topk(num_kept_tiles(nb, select), dim=-1).indices
    mask = torch.zeros(n_heads, nb, nb, dtype=torch.bool, device=device).scatter_(-1, kept, True)
    return TilePattern.from_dense_mask(mask, block_size, seq_len)


def flex_block_mask(pattern: TilePattern) -> BlockMask:
    """The same tiles as a BlockMask, every kept tile a full block (no mask_mod evaluated)."""
    n_heads, nq, width = pattern.kv_indices.shape
    nb = pattern.num_tiles
    full_idx = torch.zeros(1, n_heads, nq, nb, dtype=torch.int32, device=pattern.kv_indices.device)
    full_idx[..., :width] = pattern.kv_indices.clamp_min(0)
    empty = torch.zeros(1, n_heads, nq, dtype=torch.int32, device=full_idx.device)
    return BlockMask.from_kv_blocks(
        empty,
        torch.zeros_like(full_idx),
        full_kv_num_blocks=pattern.kv_counts[None],
        full_kv_indices=full_idx,
        BLOCK_SIZE=pattern.block_size,
    )


def rel_rms(ref, out):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def bench_dense(q, k, v, cu, seq_len, scale):
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    res = {}
    for name, backend in (
        ("sdpa_fa2", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
    ):

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q4, k4, v4, scale=scale)

        res[name] = _try(lambda run=run: bench_ms(run))
    # The fp32 `math` fallback is a correctness path, far off the others (and OOM past 16k).
    for name in (b for b in dense_backends("cuda", q.dtype, q.shape[-1]) if b != "math"):
        res[f"ours_{name}"] = _try(
            lambda n=name: bench_ms(lambda: dense_attention(q, k, v, cu, seq_len, scale, backend=n))
        )
        res[f"ours_{name}_lse"] = _try(
            lambda n=name: bench_ms(
                lambda: dense_attention(q, k, v, cu, seq_len, scale, backend=n, return_lse=True)
            )
        )
    return res


def bench_selection(q, k, cu, seq_len, gen_length, select, scale, sweep):
    """Selection with its own statistics pass, and reusing the dense LSE (per tile-mass config)."""
    _, lse = dense_attention(q, k, k, cu, seq_len, scale, return_lse=True)
    res = {}
    for cfg in MASS_SWEEP if sweep else [None]:
        key = "default" if cfg is None else _config_name(cfg)
        res[f"importance_lse_{key}"] = _try(
            lambda cfg=cfg: bench_ms(
                lambda: fused_tile_importance(q, k, cu, [gen_length], 128, scale, lse, cfg)
            )
        )
    timed = {k: v for k, v in res.items() if isinstance(v, float)}
    best_key = min(timed, key=timed.get)
    best_cfg = None if best_key.endswith("default") else MASS_SWEEP[list(res).index(best_key)]
    res["best_mass_config"] = best_cfg

    def run_select(with_lse):
        lse_arg = lse if with_lse else None
        return fused_select_pattern(q, k, cu, [gen_length], 128, select, scale, lse_arg, best_cfg)

    res["select_own_stats"] = bench_ms(lambda: run_select(False))
    res["select_reuse_lse"] = bench_ms(lambda: run_select(True))
    a, b = run_select(False), run_select(True)
    same = a.kv_indices.shape == b.kv_indices.shape and torch.equal(a.kv_indices, b.kv_indices)
    res["lse_reuse_same_tiles"] = same
    return res


def bench_sparse(q, k, v, cu, seq_len, select, scale, sweep, flex):
    n_heads = q.shape[1]
    pattern = random_pattern(n_heads, seq_len, 128, select, q.device)
    packed = pack_patterns([pattern])
    kept = int(pattern.kv_counts.sum())
    flops = 4 * q.shape[-1] * kept * 128 * 128  # QK^T and PV on the kept tiles
    res = {"kept_fraction": pattern.kept_fraction()}
    configs = SWEEP if sweep else [None]
    best = None
    for cfg in configs:
        key = "ours" if cfg is None else "ours_" + _config_name(cfg)

        def run(cfg=cfg):
            return sparse_attention(q, k, v, cu, packed, scale, config=cfg)

        ms = _try(lambda run=run: bench_ms(run))
        res[key] = ms
        if isinstance(ms, float) and (best is None or ms < best[0]):
            best = (ms, cfg)
    res["ours_default"] = _try(
        lambda: bench_ms(lambda: sparse_attention(q, k, v, cu, packed, scale))
    )
    res["ours_best_ms"], res["ours_best_config"] = best
    res["ours_best_tflops"] = flops / best[0] / 1e9
    bm = flex_block_mask(pattern)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    res["flex"] = _try(lambda: bench_ms(lambda: flex(q4, k4, v4, block_mask=bm, scale=scale)))
    if isinstance(res["flex"], float):
        res["flex_tflops"] = flops / res["flex"] / 1e9
        ours = sparse_attention(q, k, v, cu, packed, scale, config=best[1])
        res["ours_vs_flex_rel_rms"] = rel_rms(
            flex(q4, k4, v4, block_mask=bm, scale=scale)[0].transpose(0, 1), ours
        )
        res["speedup_vs_flex"] = res["flex"] / best[0]
    return res


def _config_name(cfg):
    """Readable, unique name of a launch config: `BLOCK_M128_BLOCK_N128_w8_s3_USE_TMA`."""
    parts = [f"{k}{v}" for k, v in cfg.items() if not isinstance(v, bool)]
    return "_".join(parts + [k for k, v in cfg.items() if v is True])


def _try(fn):
    # A backend or config missing on this card is a result to record, not a crash.
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {str(exc)[:160]}"


def bench_length(seq_len, args, scale, flex):
    shape = (seq_len, args.kv_heads, args.head_dim)
    q = torch.randn(seq_len, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, seq_len], dtype=torch.int32, device="cuda")
    parts = args.parts.split(",")
    row = {"dense": bench_dense(q, k, v, cu, seq_len, scale), "selection": {}, "sparse": {}}
    if "selection" in parts:
        row["selection"] = _try(
            lambda: bench_selection(q, k, cu, seq_len, args.gen_length, 0.3, scale, args.sweep)
        )
    for select in map(float, args.selects.split(",") if "sparse" in parts else []):
        row["sparse"][select] = _try(
            lambda s=select: bench_sparse(q, k, v, cu, seq_len, s, scale, args.sweep, flex)
        )
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="8192,16384,32768,65536")
    ap.add_argument("--selects", default="0.1,0.3,0.5")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--gen-length", type=int, default=512)
    ap.add_argument("--sweep", action="store_true", help="time every launch config in SWEEP")
    ap.add_argument("--parts", default="dense,selection,sparse")
    ap.add_argument("--out", default="attention_results.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    flex = torch.compile(flex_attention, dynamic=False)
    scale = 1.0 / math.sqrt(args.head_dim)
    results = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "args": vars(args),
        "lens": {},
    }
    for seq_len in tqdm(list(map(int, args.lens.split(","))), desc="lengths", unit="L"):
        results["lens"][seq_len] = bench_length(seq_len, args, scale, flex)
        tqdm.write(json.dumps({seq_len: results["lens"][seq_len]}, indent=1, default=str))
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print_table(results)
    print_selection_table(results)


def print_table(results):
    print(f"\n{results['device']}  torch {results['torch']}  triton {results['triton']}")
    print(
        "L | FA2 | cuDNN | dense+LSE | select(own) | select(LSE) | sel step / dense | "
        "select | ours ms | TFLOP/s | flex ms | flex TFLOP/s | ours/flex"
    )
    for seq_len, row in results["lens"].items():
        dense = row["dense"]
        best = min(v for k, v in dense.items() if isinstance(v, float) and "lse" not in k)
        with_lse = min(v for k, v in dense.items() if isinstance(v, float) and "lse" in k)
        sel = row["selection"] if isinstance(row["selection"], dict) else {}
        reuse = sel.get("select_reuse_lse", float("nan"))
        for s, sp in row["sparse"].items():
            if not isinstance(sp, dict):
                print(seq_len, s, sp)
                continue
            cells = [
                seq_len,
                dense.get("sdpa_fa2"),
                dense.get("sdpa_cudnn"),
                with_lse,
                sel.get("select_own_stats"),
                reuse,
                (with_lse + reuse) / best,
                s,
                sp["ours_best_ms"],
                sp["ours_best_tflops"],
                sp.get("flex"),
                sp.get("flex_tflops"),
                sp.get("speedup_vs_flex"),
            ]
            print(" | ".join(_f(c) for c in cells))


def print_selection_table(results):
    print(
        "\nL | best dense | dense+LSE | importance (best cfg) | select own stats"
        " | select reusing LSE | (dense+LSE+select) / dense"
    )
    for seq_len, row in results["lens"].items():
        sel, dense = row["selection"], row["dense"]
        if not isinstance(sel, dict) or "select_reuse_lse" not in sel:
            print(seq_len, sel)
            continue
        best = min(v for k, v in dense.items() if isinstance(v, float) and "lse" not in k)
        with_lse = min(v for k, v in dense.items() if isinstance(v, float) and "lse" in k)
        mass = min(v for k, v in sel.items() if k.startswith("importance") and isinstance(v, float))
        cells = [
            seq_len,
            best,
            with_lse,
            mass,
            sel["select_own_stats"],
            sel["select_reuse_lse"],
            (with_lse + sel["select_reuse_lse"]) / best,
        ]
        print(" | ".join(_f(c) for c in cells))


def _f(x):
    return f"{x:.2f}" if isinstance(x, float) else str(x)[:20]


if __name__ == "__main__":
    main()
