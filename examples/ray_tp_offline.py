"""Offline diffusion decoding with tensor parallelism on Ray (see docs/multi-gpu.md).

    # A GPU node of a Ray cluster (vLLM 0.32 and sparsed-vllm installed on every node):
    python examples/ray_tp_offline.py --model /models/LLaDA-8B-Instruct --tp 4
    # No checkpoint: writes a small random-weight one first (nothing is downloaded).
    python examples/ray_tp_offline.py --arch dream --tp 2

vLLM joins the running Ray cluster (`ray start` on this node, or RAY_ADDRESS) or starts a local
one. Workers are Ray actors; each loads the plugin through its entry point by itself.
On a machine without GPUs (vLLM's CPU build has no Ray support) it runs only with the test-only
platform of this repository, installed by scripts/run_tests.sh (tests/support):
`SPARSED_VLLM_TEST_RAY_PLATFORM=1 python examples/ray_tp_offline.py`.
"""

import argparse
import time
from pathlib import Path

from vllm import LLM, SamplingParams

from sparsed_vllm.checkpoint import write_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir or hub id")
    parser.add_argument("--arch", choices=["llada", "dream"], default="llada")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (GPUs)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    return parser.parse_args()


def demo_checkpoint(arch: str) -> str:
    out = Path(f".cache/demo/{arch}-small")
    if not (out / "config.json").exists():
        write_checkpoint(out, arch, preset="small", seed=0)
    return str(out)


def main() -> None:
    args = parse_args()
    model = args.model or demo_checkpoint(args.arch)
    start = time.perf_counter()
    llm = LLM(
        model=model,
        tensor_parallel_size=args.tp,
        distributed_executor_backend="ray",
        max_model_len=args.max_model_len,
    )
    print(f"engine with TP={args.tp} on Ray ready in {time.perf_counter() - start:.1f} s")

    steps = {"steps": 32}
    params = [
        SamplingParams(max_tokens=64, temperature=0, extra_args=steps),
        # SparseD from the first step on, whatever the length (it pays off on long sequences).
        SamplingParams(
            max_tokens=64,
            temperature=0,
            extra_args={**steps, "sparsed": True, "sparsed_block_size": 32},
        ),
    ]
    conversation = [{"role": "user", "content": "Explain tensor parallelism in one paragraph."}]
    start = time.perf_counter()
    outputs = llm.chat([conversation] * len(params), params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for label, output in zip(["dense", "SparseD"], outputs, strict=True):
        completion = output.outputs[0]
        print(f"\n{label}: {len(completion.token_ids)} tokens ({completion.finish_reason})")
        print(f"  {completion.text!r}")
    print(f"\n{len(outputs)} requests in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
