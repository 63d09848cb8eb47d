"""Cached steps: vLLM's FlashAttention-3 paged varlen forward vs our `cached_attention` (issue 17).

    python benchmarks/bench_fa3_cached.py --lib .gpu_fa3/_vllm_fa3_C.abi3.so.xz --out fa3.json

Loads `_vllm_fa3_C` (vLLM 0.32's FA3 build, from `scripts/gpu_fa3_bundle.sh`; a plain `.so`
works too) into this torch, records whether it loads (with the error if not), then times the
shapes of `bench_cached_attention.py` (bf16, pages of 128 shuffled in a pool): ours with the
engine's host hints against FA3's `fwd` with the paged cache (`page_table`, `seqused_k`,
non-causal) at FA3's own split heuristic (`num_splits=0`), 1 split and ours' split count. Each
output is checked against the fp32 reference (relative RMS). Eager calls, median ms of
`do_bench`.
"""

import argparse
import datetime
import json
import lzma
import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_fa3(path: str) -> str | None:
    """Load the FA3 extension into torch.ops; None on success, else the traceback."""
    try:
        if path.endswith(".xz"):
            so = os.path.join(tempfile.mkdtemp(), "_vllm_fa3_C.abi3.so")
            with lzma.open(path) as src, open(so, "wb") as dst:
                dst.write(src.read())
            path = so
        torch.ops.load_library(path)
        torch.ops._vllm_fa3_C.fwd  # noqa: B018  (raises if the op did not register)
    except Exception:  # noqa: BLE001
        return traceback.format_exc()
    return None


def fa3_paged(q, k_cache, v_cache, cu_q, kv_lens, table, max_q, max_k, scale, splits):
    """FA3's forward over a paged cache, every row attending to all of its sequence's keys.
    Arguments in the order of the op's schema (`torch.ops._vllm_fa3_C.fwd`)."""
    none3 = (None, None, None)
    out, _, _, _ = torch.ops._vllm_fa3_C.fwd(
        q, k_cache, v_cache, None, None, None, None,  # k_new, v_new, q_v, out
        cu_q, None, None, None, kv_lens,  # cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k
        max_q, max_k, table, None, None, *none3,  # kv_batch_idx, leftpad_k, rotary x3
        *none3, scale, False, -1, -1, 0.0,  # descales, scale, causal, window, softcap
        True, None, splits, None, 0, None, 1, 0, None,  # ..., num_splits, pack_gqa, sm_margin
    )  # fmt: skip
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", required=True, help="_vllm_fa3_C.abi3.so, or .so.xz")
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--out", default="fa3_cached.json")
    args = ap.parse_args(argv)
    import bench_cached_attention as bc

    rec = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_error": load_fa3(args.lib),
        "cases": {},
    }
    print("FA3 loads" if rec["load_error"] is None else rec["load_error"], flush=True)
    if rec["load_error"] is None:
        for model in ("llada", "dream"):
            for shape in bc.SHAPES:
                key = f"{model}/{shape[0]}"
                try:
                    rec["cases"][key] = bc.compare_paged(
                        model, shape, args.rep_ms, "fa3", fa3_paged
                    )
                except Exception as exc:  # noqa: BLE001
                    rec["cases"][key] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                print(key, json.dumps(rec["cases"][key]), flush=True)
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1)
    print("\n| case | ours ms | FA3 ms (heuristic / 1 split / ours' splits) | ours vs best FA3 |")
    print("|---|---|---|---|")
    for key, row in rec["cases"].items():
        if "error" in row:
            print(f"| {key} | {row['error'][:80]} | | |")
            continue
        ms = [row[f"fa3_splits{n}_ms"] for n in (0, 1, row["plan"]["num_splits"])]
        print(
            f"| {key} | {row['ours_ms']:.3f} | {' / '.join(f'{m:.3f}' for m in ms)} "
            f"| {min(ms) / row['ours_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
