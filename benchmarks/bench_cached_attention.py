"""Cached-step attention benchmark: `cached_attention` over a paged KV cache vs gather + dense.

At a cached diffusion step each sequence feeds a window of query rows that attend to all its keys,
read from a vLLM-style paged cache (pages shuffled in a larger pool). Shapes, bf16, PAGE 128, for
LLaDA-8B (Hq = Hkv = 32, D = 128) and Dream-7B (Hq = 28, Hkv = 4, D = 128):
  (a) 32 sequences x 32 query rows, 768 keys each;
  (b) one sequence, 32 query rows, 16k / 32k / 64k keys (split-K territory);
  (c) one sequence, 224 query rows (block + later blocks), 768 keys.
Each row times:
- ours: `cached_attention` with the caller's host hints (`max_seqlen_q`, `max_kv_len`), without
  hints, and under a CUDA graph; with `--sweep` every launch override in `SWEEP` as well;
- gather + dense: the pages gathered with `index_select` into contiguous K/V, then SDPA
  (FlashAttention-2, cuDNN with K/V expanded to Hq heads, memory-efficient) or PyTorch's bundled
  FA2 varlen; and the same dense kernels on K/V already contiguous (`contig_*`: no paging at all).
Reports milliseconds (median of `triton.testing.do_bench`), GB/s of K/V read (each sequence's K and
V once: the bytes any exact kernel must read) and TFLOP/s.

    python benchmarks/bench_cached_attention.py --out cached_attention.json
"""

import argparse
import datetime
import json
import math

import torch
import torch.nn.functional as F
import triton
from sparsed_vllm.kernels import cached_attention, cached_attention_ref
from sparsed_vllm.kernels.cached.fused import launch_plan
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

DEVICE = "cuda"
MODELS = {"llada": (32, 32, 128), "dream": (28, 4, 128)}
# (name, query rows per sequence, keys per sequence, sequences)
SHAPES = [
    ("a-batch32", 32, 768, 32),
    ("b-16k", 32, 16384, 1),
    ("b-32k", 32, 32768, 1),
    ("b-64k", 32, 65536, 1),
    ("c-window224", 224, 768, 1),
]
SWEEP = [
    {"num_splits": 1},
    {"num_splits": 2},
    {"num_splits": 4},
    {"num_splits": 8},
    {"num_splits": 16},
    {"num_splits": 32},
    {"BLOCK_N": 32},
    {"BLOCK_N": 128},
    {"num_stages": 2},
    {"num_stages": 4},
    {"BLOCK_M": 64},
    {"BLOCK_M": 64, "num_warps": 8},
    {"BLOCK_M": 128, "num_warps": 8},
    {"PACK_GQA": False},
]


def bench_ms(fn, rep_ms: int) -> float:
    """Median milliseconds per call (CUDA events via do_bench, after warm-up)."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def graph_ms(fn, rep_ms: int) -> float:
    """Median milliseconds per replay of `fn` captured in a CUDA graph (no host overhead)."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def _try(fn):
    # A backend or config missing on this card is a result to record, not a crash.
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {str(exc)[:160]}"


def make_batch(q_rows, kv_len, n_seqs, n_heads, n_kv, head_dim, page, seed=0):
    """Query rows and a shuffled page pool (10% unused pages) holding each sequence's keys."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    pages_per_seq = -(-kv_len // page)
    n_pages = n_seqs * pages_per_seq
    pool = n_pages + max(1, n_pages // 10)
    cache_shape = (2, pool, page, n_kv, head_dim)
    cache = torch.randn(cache_shape, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    perm = torch.randperm(pool, generator=gen, device=DEVICE)[:n_pages]
    table = perm.view(n_seqs, pages_per_seq).to(torch.int32)
    q_shape = (n_seqs * q_rows, n_heads, head_dim)
    q = torch.randn(q_shape, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    cu = torch.arange(n_seqs + 1, device=DEVICE, dtype=torch.int32) * q_rows
    kv_lens = torch.full((n_seqs,), kv_len, device=DEVICE, dtype=torch.int32)
    return q, cache[0], cache[1], cu, kv_lens, table


def compare_paged(model, shape, rep_ms, name, other, first_call=None):
    """One shape of SHAPES: ours (with the engine's host hints) against another paged kernel
    `other(q, k_cache, v_cache, cu, kv_lens, table, max_seqlen_q, max_kv_len, scale, splits)` at
    split counts 0 (its own heuristic), 1 and ours'. -> {"plan", "ours_ms", "ours_rel_rms",
    "<name>_splits<n>_ms" / "_rel_rms" (vs the fp32 reference), and "_first_call_s" timed by
    `first_call(fn)` when given (a JIT compile)}."""
    n_heads, n_kv, head_dim = MODELS[model]
    _, q_rows, kv_len, n_seqs = shape
    scale = 1.0 / math.sqrt(head_dim)
    batch = make_batch(q_rows, kv_len, n_seqs, n_heads, n_kv, head_dim, 128)
    q = batch[0]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    plan = launch_plan(q.shape[0], n_seqs, n_heads, n_kv, head_dim, 128, q_rows, kv_len, sms)
    want = cached_attention_ref(*batch, scale).double()

    def ours():
        return cached_attention(*batch, scale, max_seqlen_q=q_rows, max_kv_len=kv_len)

    def rel(fn):
        return float((fn().double() - want).norm() / want.norm())

    row = {"plan": plan, "ours_ms": bench_ms(ours, rep_ms), "ours_rel_rms": rel(ours)}
    for n in sorted({0, 1, plan["num_splits"]}):

        def run(n=n):
            return other(*batch, q_rows, kv_len, scale, n)

        key = f"{name}_splits{n}"
        if first_call is not None:
            row[f"{key}_first_call_s"] = first_call(run)
        row[f"{key}_ms"] = bench_ms(run, rep_ms)
        row[f"{key}_rel_rms"] = rel(run)
    return row


def gather(cache, table, kv_len):
    """`[B, kv_len, Hkv, D]` contiguous K or V of equal-length sequences (one index_select)."""
    n_seqs, pages = table.shape
    flat = cache.index_select(0, table.flatten().long())
    return flat.view(n_seqs, pages * cache.shape[1], *cache.shape[2:])[:, :kv_len]


def sdpa(backend, q, k, v, q_rows, scale):
    """SDPA on `[B, L, H, D]` tensors; cuDNN and memory-efficient get K/V expanded to Hq."""
    n_seqs, n_heads = k.shape[0], q.shape[1]
    q4 = q.view(n_seqs, q_rows, n_heads, -1).transpose(1, 2)
    k4, v4 = (t.transpose(1, 2) for t in (k, v))
    gqa = k4.shape[1] != n_heads
    if gqa and backend != SDPBackend.FLASH_ATTENTION:
        group = n_heads // k4.shape[1]
        k4, v4 = (t.repeat_interleave(group, dim=1) for t in (k4, v4))
        gqa = False
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q4, k4, v4, scale=scale, enable_gqa=gqa)


def fa2_varlen(q, k, v, q_rows, kv_len, scale):
    """PyTorch's bundled FlashAttention-2 varlen forward (native GQA, Lq != Lk)."""
    n_seqs = k.shape[0]
    cu_q = torch.arange(n_seqs + 1, device=DEVICE, dtype=torch.int32) * q_rows
    cu_k = torch.arange(n_seqs + 1, device=DEVICE, dtype=torch.int32) * kv_len
    out, *_ = torch.ops.aten._flash_attention_forward(
        q,
        k.flatten(0, 1),
        v.flatten(0, 1),
        cu_q,
        cu_k,
        q_rows,
        kv_len,
        0.0,
        False,
        False,
        scale=scale,
    )
    return out


def bench_baselines(q, k_cache, v_cache, table, q_rows, kv_len, scale, rep_ms):
    res = {}
    k, v = gather(k_cache, table, kv_len).contiguous(), gather(v_cache, table, kv_len).contiguous()
    backends = {
        "fa2": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    for name, backend in backends.items():

        def paged(backend=backend):
            kg, vg = gather(k_cache, table, kv_len), gather(v_cache, table, kv_len)
            return sdpa(backend, q, kg, vg, q_rows, scale)

        res[f"gather_sdpa_{name}"] = _try(lambda paged=paged: bench_ms(paged, rep_ms))
        res[f"contig_sdpa_{name}"] = _try(
            lambda b=backend: bench_ms(lambda: sdpa(b, q, k, v, q_rows, scale), rep_ms)
        )

    def paged_varlen():
        kg, vg = gather(k_cache, table, kv_len), gather(v_cache, table, kv_len)
        return fa2_varlen(q, kg, vg, q_rows, kv_len, scale)

    res["gather_fa2_varlen"] = _try(lambda: bench_ms(paged_varlen, rep_ms))
    res["contig_fa2_varlen"] = _try(
        lambda: bench_ms(lambda: fa2_varlen(q, k, v, q_rows, kv_len, scale), rep_ms)
    )
    return res


def bench_ours(q, k_cache, v_cache, cu, kv_lens, table, q_rows, kv_len, scale, args):
    hints = {"max_seqlen_q": q_rows, "max_kv_len": kv_len}

    def run(config=None, **kw):
        return cached_attention(q, k_cache, v_cache, cu, kv_lens, table, scale, config=config, **kw)

    res = {
        "ours": bench_ms(lambda: run(**hints), args.rep_ms),
        "ours_no_hints": _try(lambda: bench_ms(run, args.rep_ms)),
        "ours_graph": _try(lambda: graph_ms(lambda: run(**hints), args.rep_ms)),
    }
    if args.sweep:
        for cfg in SWEEP:
            name = "ours_" + "_".join(f"{k}{v}" for k, v in cfg.items())
            res[name] = _try(lambda cfg=cfg: bench_ms(lambda: run(cfg, **hints), args.rep_ms))
    want = cached_attention_ref(q, k_cache, v_cache, cu, kv_lens, table, scale)
    want = want.double()
    res["rel_rms_vs_ref"] = float((run(**hints).double() - want).norm() / want.norm())
    return res


def bench_shape(model, shape, args):
    n_heads, n_kv, head_dim = MODELS[model]
    name, q_rows, kv_len, n_seqs = shape
    scale = 1.0 / math.sqrt(head_dim)
    q, k_cache, v_cache, cu, kv_lens, table = make_batch(
        q_rows, kv_len, n_seqs, n_heads, n_kv, head_dim, args.page
    )
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    plan = launch_plan(
        q.shape[0], n_seqs, n_heads, n_kv, head_dim, args.page, q_rows, kv_len, num_sms
    )
    row = {"model": model, "shape": name, "q_rows": q_rows, "kv_len": kv_len, "seqs": n_seqs}
    row["plan"] = plan
    row.update(bench_ours(q, k_cache, v_cache, cu, kv_lens, table, q_rows, kv_len, scale, args))
    if not args.no_baselines:
        row.update(bench_baselines(q, k_cache, v_cache, table, q_rows, kv_len, scale, args.rep_ms))
    kv_bytes = 2 * n_seqs * kv_len * n_kv * head_dim * q.element_size()
    flops = 4 * n_seqs * q_rows * n_heads * kv_len * head_dim
    row["kv_bytes"], row["flops"] = kv_bytes, flops
    for key, ms in list(row.items()):
        if isinstance(ms, float) and _is_time(key):
            row[f"{key}_kv_gbps"] = kv_bytes / ms / 1e6
            row[f"{key}_tflops"] = flops / ms / 1e9
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llada,dream")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--page", type=int, default=128)
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--sweep", action="store_true", help="also time every override in SWEEP")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--out", default="cached_attention_results.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "args": vars(args),
        "rows": [],
    }
    wanted = args.shapes.split(",")
    cases = [(m, s) for m in args.models.split(",") for s in SHAPES if s[0] in wanted]
    for model, shape in tqdm(cases, desc="shapes", unit="shape"):
        row = _try(lambda m=model, s=shape: bench_shape(m, s, args))
        results["rows"].append(row if isinstance(row, dict) else {"error": row})
        tqdm.write(json.dumps(results["rows"][-1], default=str))
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print_table(results)


def print_table(results):
    print(f"\n{results['device']}  torch {results['torch']}  triton {results['triton']}")
    print(
        "model | shape | splits | ours ms | ours GB/s | graph ms | best sweep ms | "
        "gather+FA2 varlen ms | gather+best SDPA ms | contig best ms | speedup vs gather+best"
    )
    for row in results["rows"]:
        if "error" in row:
            print(row["error"])
            continue
        timed = {k: v for k, v in row.items() if isinstance(v, float) and _is_time(k)}
        sweep = [v for k, v in timed.items() if k.startswith("ours")]
        gathered = [v for k, v in timed.items() if k.startswith("gather")]
        contig = [v for k, v in timed.items() if k.startswith("contig")]
        best_gather = min(gathered, default=float("nan"))
        cells = [
            row["model"],
            row["shape"],
            row["plan"]["num_splits"],
            row["ours"],
            row["ours_kv_gbps"],
            row.get("ours_graph"),
            min(sweep),
            row.get("gather_fa2_varlen"),
            min((v for k, v in timed.items() if k.startswith("gather_sdpa")), default=None),
            min(contig, default=None),
            best_gather / row["ours"],
        ]
        print(" | ".join(_f(c) for c in cells))


def _is_time(key: str) -> bool:
    return not key.endswith(("_kv_gbps", "_tflops")) and key != "rel_rms_vs_ref"


def _f(x):
    return f"{x:.3f}" if isinstance(x, float) else str(x)[:24]


if __name__ == "__main__":
    main()
