"""Tensor parallelism on GPUs: TP=2 must give the same tokens as TP=1 (fp32, dense and SparseD).

bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_tp.py --out out      # on a 2-GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm_e2e import PROMPTS, SPARSE_SMALL, generate_ids, make_llm, write_checkpoint  # noqa: E402


def run(model: Path, tp: int) -> dict[str, list[list[int]]]:
    # vLLM's custom all-reduce is a compiled op this torch cannot load; NCCL serves.
    llm = make_llm(model, "float32", 256, tensor_parallel_size=tp, disable_custom_all_reduce=True)
    result = {
        "dense": generate_ids(llm, PROMPTS, {"sparsed": False}, 32, 32, 8),
        "sparsed": generate_ids(llm, PROMPTS, SPARSE_SMALL, 32, 32, 8),
    }
    llm.llm_engine.engine_core.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out")
    parser.add_argument("--work", default="/tmp/sparsed-tp")
    args = parser.parse_args()
    model = Path(args.work) / "llada-small"
    if write_checkpoint(model, "--preset", "small").wait():
        raise SystemExit("checkpoint writing failed")
    one, two = run(model, 1), run(model, 2)
    report = {k: {"tp1": one[k], "tp2": two[k], "equal": one[k] == two[k]} for k in one}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_vllm_tp.json").write_text(json.dumps(report, indent=1))
    for mode, row in report.items():
        print(f"TP=2 vs TP=1 ({mode}): tokens equal = {row['equal']}", flush=True)


if __name__ == "__main__":
    main()
