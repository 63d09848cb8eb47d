r"""FlashAttention-4 block-sparse (CuTe DSL, vLLM 0.32's `vllm_flash_attn.cute`) vs our Triton
`sparse_attention` vs Flex, on the LLaDA-8B attention shape (32 heads x 128, bf16, one sequence);
FA4 dense vs cuDNN SDPA as a sanity baseline (issue 17). Same random top-k patterns and TFLOP/s
formula as bench_attention.py (`4 * D * kept_tiles * 128 * 128`). Every stage is guarded: a failure
is recorded (full traceback) in the JSON, which is rewritten after each stage, and the run goes on.
Order: FA4 dense, FA4 sparse and Triton per case while `--budget-s` lasts, then the varlen probe
(always), then Flex (it recompiles per length) while the budget lasts.

    python benchmarks/bench_fa4.py --out fa4.json [--lens 8192,16384] [--varlen-check]
    python benchmarks/bench_fa4.py --out fa4.json --cached-only   # cached steps only

`--cached` adds the cached steps (issue 17, item 2): a window of query rows against all of a
sequence's keys in a paged cache, the shapes of bench_cached_attention.py, our `cached_attention`
against FA4's paged varlen forward (`page_table`, `seqused_k`, non-causal) with 1 split, FA4's
own split heuristic (`num_splits=0`) and as many splits as ours uses, all checked against the
fp32 reference.

On a GPU machine without network, `scripts/gpu_fa4_probe.sh` stages the FA4 bundle of
`scripts/gpu_fa4_bundle.sh`, runs the FA4 tests and then this script (docs/gpu-vllm.md).
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch

# Set in main(): bench_attention (imports triton) and the FA4 adapter load only on the GPU machine.
BA = None
FA4 = None


def stage(record: dict, name: str, fn, *args):
    """Run `fn(*args)`; store its result, or the error with its full traceback, under `name`."""
    try:
        record[name] = fn(*args)
    except Exception as exc:  # noqa: BLE001
        tb = traceback.format_exc()
        record[name] = {"error": f"{type(exc).__name__}: {exc}"[:400], "traceback": tb}
        print(f"[{name}] FAILED\n{tb}", flush=True)
    return record[name]


def timed_first_call(fn):
    """Seconds of the first call (CuTe JIT compilation for a new kernel), synchronised."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def environment() -> dict:
    env = {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for name in ("triton", "cutlass", "tvm_ffi", "quack"):
        try:
            env[name] = getattr(__import__(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            env[name] = f"import error: {exc}"
    return env


def make_qkv(seq_len, args):
    q = torch.randn(seq_len, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
    shape = (seq_len, args.kv_heads, args.head_dim)
    k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, seq_len], dtype=torch.int32, device="cuda")
    return q, k, v, cu


def bench_dense(q, k, v, scale, rep_ms):
    """FA4 dense (no block sparsity) vs cuDNN SDPA, ms and TFLOP/s on the full L x L."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq_len, n_heads, head_dim = q.shape
    flops = 4 * head_dim * n_heads * seq_len * seq_len
    interface = FA4._fa4()[0]
    q4, k4, v4 = q[None], k[None], v[None]

    def fa4():
        return interface.flash_attn_func(q4, k4, v4, softmax_scale=scale, causal=False)[0]

    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)

    res = {}
    stage(res, "fa4_first_call_s", timed_first_call, fa4)
    stage(res, "fa4_ms", BA.bench_ms, fa4, rep_ms)
    stage(res, "cudnn_ms", BA.bench_ms, cudnn, rep_ms)
    for key in ("fa4", "cudnn"):
        if isinstance(res.get(f"{key}_ms"), float):
            res[f"{key}_tflops"] = flops / res[f"{key}_ms"] / 1e9
    stage(res, "fa4_vs_cudnn_rel_rms", lambda: BA.rel_rms(cudnn()[0].transpose(0, 1), fa4()[0]))
    return res


def bench_sparse(q, k, v, cu, seq_len, select, scale, args):
    """FA4 block-sparse vs Triton `sparse_attention` on one random pattern (Flex comes later)."""
    from sparsed_vllm.kernels import sparse_attention

    from sparsed_vllm.core.pattern import pack_patterns

    pattern = BA.random_pattern(q.shape[1], seq_len, 128, select, q.device)
    packed = pack_patterns([pattern])
    kept = int(pattern.kv_counts.sum())
    res = {"kept_fraction": pattern.kept_fraction(), "flops": 4 * q.shape[-1] * kept * 128 * 128}
    prepared = stage(res, "fa4_prepare", FA4.prepare_fa4_pattern, packed)
    if isinstance(prepared, dict):
        return res, pattern
    res["fa4_prepare"] = "ok"
    stage(res, "fa4_prepare_ms", lambda: BA.bench_ms(lambda: FA4.prepare_fa4_pattern(packed), 100))

    def fa4():
        return FA4.fa4_sparse_attention(q, k, v, cu, prepared, scale)

    def triton_ours():
        return sparse_attention(q, k, v, cu, packed, scale)

    stage(res, "fa4_first_call_s", timed_first_call, fa4)
    stage(res, "fa4_ms", BA.bench_ms, fa4, args.rep_ms)
    stage(res, "triton_ms", BA.bench_ms, triton_ours, args.rep_ms)
    for key in ("fa4", "triton"):
        if isinstance(res.get(f"{key}_ms"), float):
            res[f"{key}_tflops"] = res["flops"] / res[f"{key}_ms"] / 1e9
    if isinstance(res.get("fa4_ms"), float) and isinstance(res.get("triton_ms"), float):
        res["triton_over_fa4"] = res["triton_ms"] / res["fa4_ms"]
    stage(res, "fa4_vs_triton_rel_rms", lambda: BA.rel_rms(triton_ours(), fa4()))
    return res, pattern


def bench_flex(q, k, v, pattern, scale, flex, res, rep_ms):
    bm = BA.flex_block_mask(pattern)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    stage(res, "flex_ms", BA.bench_ms, lambda: flex(q4, k4, v4, block_mask=bm, scale=scale), rep_ms)
    if isinstance(res["flex_ms"], float):
        res["flex_tflops"] = res["flops"] / res["flex_ms"] / 1e9


def varlen_check(args, scale):
    """One varlen batch through FA4's varlen block-sparse path and the per-sequence path."""
    from sparsed_vllm.kernels import sparse_attention_ref

    from sparsed_vllm.core.pattern import pack_patterns

    lens = [int(n) for n in args.varlen_lens.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(7)
    total = sum(lens)
    q = torch.randn(total, args.heads, args.head_dim, device="cuda", generator=gen)
    k, v = (
        torch.randn(total, args.kv_heads, args.head_dim, device="cuda", generator=gen) for _ in "kv"
    )
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    cu = torch.tensor([0, *lens], device="cuda").cumsum(0).to(torch.int32)
    patterns = [BA.random_pattern(args.heads, n, 128, 0.3, "cuda") for n in lens]
    packed = pack_patterns(patterns)
    ref = sparse_attention_ref(q, k, v, cu, packed, scale)
    res = {"lens": lens, "heads": args.heads, "kv_heads": args.kv_heads}

    def errors(out):
        per_seq = [
            BA.rel_rms(ref[s:e], out[s:e])
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        ]
        return {
            "rel_rms": BA.rel_rms(ref, out),
            "per_sequence": per_seq,
            "nan": bool(out.isnan().any()),
        }

    def varlen():
        return FA4.fa4_sparse_attention_varlen(q, k, v, cu, packed, scale)

    def per_sequence():
        return FA4.fa4_sparse_attention(q, k, v, cu, packed, scale)

    stage(res, "varlen_first_call_s", timed_first_call, varlen)
    stage(res, "varlen", lambda: errors(varlen()))
    stage(res, "per_sequence", lambda: errors(per_sequence()))
    stage(res, "varlen_ms", BA.bench_ms, varlen, args.rep_ms)
    stage(res, "per_sequence_ms", BA.bench_ms, per_sequence, args.rep_ms)
    return res


class Recorder:
    """The results dict, rewritten to `path` (atomically) after every stage."""

    def __init__(self, path, data):
        self.path, self.data = path, data
        self.save()

    def save(self):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lens", default="8192,16384,32768,65536")
    ap.add_argument("--selects", default="0.1,0.3,0.5")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rep-ms", type=int, default=300, help="timing window per measurement")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no case after this")
    ap.add_argument("--no-flex", action="store_true", help="skip the Flex pass")
    ap.add_argument("--varlen-check", action="store_true", help="probe FA4 varlen block sparsity")
    ap.add_argument("--varlen-lens", default="1000,4097,2500")
    ap.add_argument("--cached", action="store_true", help="also the cached-step shapes")
    ap.add_argument("--cached-only", action="store_true", help="only the cached-step shapes")
    ap.add_argument("--out", default="fa4_results.json")
    return ap.parse_args(argv)


def main(argv=None):
    global BA, FA4
    args = parse_args(argv)
    start = time.perf_counter()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_attention
    from sparsed_vllm.kernels.block_sparse import fa4

    BA, FA4 = bench_attention, fa4
    rec = Recorder(args.out, {"args": vars(args), "env": environment(), "dense": {}, "sparse": {}})
    err = fa4.fa4_import_error()
    rec.data["fa4_import_error"] = err
    rec.data["fa4_available"] = fa4.fa4_available()
    rec.save()
    if not rec.data["fa4_available"]:
        print(f"FA4 unavailable on {rec.data['env']['device']}:\n{err}", flush=True)
        return 2
    torch.manual_seed(0)
    scale = 1.0 / math.sqrt(args.head_dim)
    budget = Budget(start, args.budget_s)
    if args.cached or args.cached_only:
        rec.data["cached"] = {}
        run_cached(rec, args)
        if args.cached_only:
            print_cached(rec.data["cached"])
            return 0
    patterns = {}
    for seq_len in (int(n) for n in args.lens.split(",")):
        if budget.over(rec, "stopped", f"L={seq_len}"):
            break
        run_length(rec, seq_len, args, scale, budget, patterns)
        torch.cuda.empty_cache()
    # After the cases and whatever the budget: a crash in this mode (reported before) can leave
    # the CUDA context unusable, and it should not cost the timings.
    if args.varlen_check:
        stage(rec.data, "varlen_check", varlen_check, args, scale)
        print("varlen_check", json.dumps(rec.data["varlen_check"], default=str)[:2000], flush=True)
        rec.save()
    if not args.no_flex:
        stage(rec.data, "flex_pass", run_flex_pass, rec, patterns, args, scale, budget)
    print_tables(rec.data)
    return 0


def fa4_paged(q, k_cache, v_cache, cu, kv_lens, table, max_q, max_k, scale, splits):
    """FA4's varlen forward over a paged cache, non-causal (`num_splits=0`: its heuristic)."""
    interface, _ = FA4._fa4()
    return interface.flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q=cu, seqused_k=kv_lens, page_table=table,
        max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=scale, causal=False,
        num_splits=splits,
    )[0]  # fmt: skip


def cached_case(model, shape, args):
    """One cached-step shape: ours vs FA4 paged (split counts 1, FA4's choice, ours), ms, the
    first call's compile time and relative RMS error against the fp32 reference."""
    import bench_cached_attention as bc

    return bc.compare_paged(model, shape, args.rep_ms, "fa4", fa4_paged, timed_first_call)


def run_cached(rec, args):
    import bench_cached_attention as bc

    for model in ("llada", "dream"):
        for shape in bc.SHAPES:
            key = f"{model}/{shape[0]}"
            stage(rec.data["cached"], key, cached_case, model, shape, args)
            print(key, json.dumps(rec.data["cached"][key], default=str)[:600], flush=True)
            rec.save()
            torch.cuda.empty_cache()


def print_cached(cached):
    print("\n| case | ours ms | FA4 ms: 1 split | FA4's splits | ours' splits | ours / best FA4 |")
    print("|---|---|---|---|---|---|")
    for key, row in cached.items():
        if "error" in row:
            print(f"| {key} | error: {row['error'][:80]} | | | | |")
            continue
        ms = [row.get(f"fa4_splits{n}_ms") for n in (1, 0, row["plan"]["num_splits"])]
        best = min(m for m in ms if isinstance(m, float))
        cells = " | ".join(_f(m) for m in ms)
        print(f"| {key} | {_f(row['ours_ms'])} | {cells} | {row['ours_ms'] / best:.2f} |")


class Budget:
    """Wall-clock budget: no new case starts once `budget_s` seconds have passed."""

    def __init__(self, start: float, budget_s: float):
        self.start, self.budget_s = start, budget_s

    def over(self, rec, key: str, what: str) -> bool:
        if time.perf_counter() - self.start <= self.budget_s:
            return False
        rec.data[key] = f"budget of {self.budget_s:.0f} s reached before {what}"
        rec.save()
        return True


def run_length(rec, seq_len, args, scale, budget, patterns):
    """Dense baselines, then FA4 vs Triton for every `select`, at one length."""
    q, k, v, cu = make_qkv(seq_len, args)
    stage(rec.data["dense"], str(seq_len), bench_dense, q, k, v, scale, args.rep_ms)
    rec.save()
    for select in (float(s) for s in args.selects.split(",")):
        key = f"{seq_len}/{select}"
        if budget.over(rec, "stopped", key):
            return
        out = stage(
            rec.data["sparse"], key, bench_sparse, q, k, v, cu, seq_len, select, scale, args
        )
        if isinstance(out, tuple):
            rec.data["sparse"][key], patterns[key] = out
        print(key, json.dumps(rec.data["sparse"][key], default=str)[:600], flush=True)
        rec.save()


def run_flex_pass(rec, patterns, args, scale, budget):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    for key, pattern in patterns.items():
        if budget.over(rec, "flex_stopped", key):
            break
        q, k, v, _ = make_qkv(int(key.split("/")[0]), args)
        res = rec.data["sparse"][key]
        stage(res, "flex", bench_flex, q, k, v, pattern, scale, flex, res, args.rep_ms)
        rec.save()
    return "done"


def print_tables(data):
    env = data["env"]
    versions = f"torch {env['torch']}  triton {env.get('triton')}  cutlass {env.get('cutlass')}"
    print(f"\n{env['device']}  {versions}")
    print("\n| L | FA4 dense ms | TFLOP/s | cuDNN ms | TFLOP/s | rel RMS |")
    print("|---|---|---|---|---|---|")
    for seq_len, d in data["dense"].items():
        cells = [seq_len, *(d.get(c) for c in ("fa4_ms", "fa4_tflops", "cudnn_ms", "cudnn_tflops"))]
        print("| " + " | ".join(_f(c) for c in [*cells, d.get("fa4_vs_cudnn_rel_rms")]) + " |")
    print(
        "\n| L | select | kept | FA4 ms | TFLOP/s | Triton ms | TFLOP/s | Flex ms | TFLOP/s "
        "| Triton/FA4 | rel RMS FA4 vs Triton |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cols = (
        "kept_fraction",
        "fa4_ms",
        "fa4_tflops",
        "triton_ms",
        "triton_tflops",
        "flex_ms",
        "flex_tflops",
        "triton_over_fa4",
        "fa4_vs_triton_rel_rms",
    )
    for key, s in data["sparse"].items():
        seq_len, select = key.split("/")
        print("| " + " | ".join(_f(c) for c in [seq_len, select, *(s.get(c) for c in cols)]) + " |")
    if "varlen_check" in data:
        print("\nvarlen check:", json.dumps(data["varlen_check"], default=str)[:1500])


def _f(x):
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 0.01 else f"{x:.2f}"
    if isinstance(x, dict) and "error" in x:
        return "ERR " + x["error"][:40]
    return str(x)[:40]


if __name__ == "__main__":
    sys.exit(main())
