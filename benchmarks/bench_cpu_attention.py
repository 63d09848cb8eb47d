"""CPU attention: SparseD's CPU path (gathering kept tiles) vs dense SDPA vs the masked reference.

One sequence, fp32, `--heads` heads of 128, a pattern selected by `select_pattern` (tiles of 128,
select 0.3, 256 generated tokens) from random q/k. Medians over `--repeat` calls after a warm-up.

    python benchmarks/bench_cpu_attention.py --lens 2048,4096,8192 --heads 8 --threads 2
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsed_vllm.core.pattern import (
    block_sparse_attention_gather,
    block_sparse_attention_ref,
    default_scale,
    select_pattern,
)


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lens", default="2048,4096,8192")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--select", type=float, default=0.3)
    parser.add_argument(
        "--ref-max-len", type=int, default=4096, help="skip the masked reference above this"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {args.threads}, heads {args.heads} x 128, fp32, select {args.select}")
    print("| L | kept | dense SDPA ms | gather ms | speed-up | masked reference ms |")
    print("|---|---|---|---|---|---|")
    for length in (int(x) for x in args.lens.split(",")):
        print(row(length, args))


def row(length: int, args: argparse.Namespace) -> str:
    """One markdown table row for sequence length `length`."""
    q, k, v = (torch.randn(length, args.heads, 128) for _ in range(3))
    scale = default_scale(128)
    pattern = select_pattern(q, k, 256, 128, args.select, scale)
    qt, kt, vt = (t.transpose(0, 1) for t in (q, k, v))
    dense = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale), 3)
    gather = median_ms(lambda: block_sparse_attention_gather(q, k, v, pattern, scale), args.repeat)
    ref = "-"
    if length <= args.ref_max_len:
        ref = f"{median_ms(lambda: block_sparse_attention_ref(q, k, v, pattern, scale), 1):.0f}"
    return (
        f"| {length} | {pattern.kept_fraction():.2f} | {dense:.0f} | {gather:.0f} | "
        f"{dense / gather:.2f}x | {ref} |"
    )


if __name__ == "__main__":
    main()
