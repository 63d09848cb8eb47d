"""Cached steps replayed as CUDA graphs (`runner.cuda_graphs`) against eager steps, on a GPU.

    bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_graphs.py --out out [--length 8192]

LLaDA-8B shape (32 layers, bf16, vLLM's random weights), one request of `--length` tokens, 256
new tokens, blocks of 32, T = 256, dual cache with and without SparseD: one in-process engine with
eager steps, then one with graphs. Every step is timed and labelled (as in gpu_vllm_race.py);
the output tokens of the two engines must be equal. Writes `gpu_vllm_graphs.json` in --out.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm_race import BLOCK, GEN, STEPS, make_engine, step_kinds  # noqa: E402

MODES = {
    "dual": {"cache": "dual", "sparsed": False},
    "dual + SparseD": {"cache": "dual", "sparsed": True},
}


def generate(engine, prompt: list[int], extra: dict, tag: str) -> tuple[list[int], list[float]]:
    """Output tokens and the seconds of each engine step of one request."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True, extra_args=extra)
    engine.add_request(tag, {"prompt_token_ids": prompt}, sp)
    tokens, times = [], []
    while engine.has_unfinished_requests():
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        for out in outputs:
            tokens = list(out.outputs[0].token_ids)
    return tokens, times


def compare(args, runners: dict[str, dict], modes: dict[str, dict], name: str) -> dict:
    """Each mode's request in one engine per runner setting (in order; the first is the
    baseline): step times by kind and output tokens, written to `<out>/<name>.json`."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.work) / "llada"
    cmd = [sys.executable, "-m", "sparsed_vllm.checkpoint", "--arch", "llada", "--out", str(model)]
    cmd += ["--preset", "full", "--layers", str(args.layers), "--max-len", str(args.length)]
    subprocess.run(cmd + ["--no-weights"], check=True, stdout=subprocess.DEVNULL)
    mask_id = json.loads((model / "config.json").read_text())["mask_token_id"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 100000, (args.length - GEN,), generator=g).tolist()
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    report.update(argv=sys.argv[1:], runs={})
    for label, runner in runners.items():
        engine = make_engine(model, args.length, additional_config={"runner": runner})
        for mode, decoding in modes.items():
            extra = {"steps": STEPS, "block_length": BLOCK, **decoding}
            # Untimed first: kernels compile and cuDNN plans at this shape.
            generate(engine, prompt, {**extra, "steps": 16, "block_length": 32}, f"warm-{mode}")
            tokens, times = generate(engine, prompt, extra, f"{label}-{mode}")
            kinds = step_kinds(len(prompt), extra, mask_id)
            by_kind: dict[str, list[float]] = {}
            for kind, seconds in zip(kinds, times, strict=False):
                by_kind.setdefault(kind, []).append(seconds)
            row = {
                "total_s": sum(times),
                "median_ms": {k: 1000 * statistics.median(v) for k, v in by_kind.items()},
                "tokens": tokens,
            }
            report["runs"][f"{label} {mode}"] = row
            print(f"{label} {mode}: {row['total_s']:.2f} s {row['median_ms']}", flush=True)
            (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        engine.engine_core.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    base, *others = runners
    for label, mode in itertools.product(others, modes):
        runs = report["runs"]
        same = runs[f"{base} {mode}"]["tokens"] == runs[f"{label} {mode}"]["tokens"]
        report[f"{mode}: {label} tokens == {base} tokens"] = same
        print(f"{mode}: {label} tokens == {base} tokens: {same}", flush=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    return report


def parse_args(eager_option: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--work", default="/tmp/sparsed-graphs")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=32)
    if eager_option:
        parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    return parser.parse_args()


def main() -> None:
    runners = {"eager": {"cuda_graphs": False}, "graphs": {"cuda_graphs": True}}
    compare(parse_args(), runners, MODES, "gpu_vllm_graphs")


if __name__ == "__main__":
    main()
