"""The long-context race: exact dense, exact SparseD, dual cache, dual cache + SparseD (issue 15).

    bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_race.py --out out [--lengths 16384,32768,65536] \
        [--runner '{"cuda_graphs": true}']

One request at a time through an in-process vLLM engine with the plugin, LLaDA-8B shape (32
layers, bf16, vLLM's random weights), prompt of L - 256 tokens, 256 new tokens, blocks of 32,
T = 256 steps. Every engine step is timed and labelled with its kind (full / refresh / cached x
dense / select / sparse), which the request's own plan gives (`core.request`, replayed on the
CPU: fixed-step schedules do not depend on the logits). Dual modes run whole. Exact modes cost
the same every step of a kind (the whole sequence), so they run `--exact-steps` steps and are
projected to T = 256 from the per-kind median: exact SparseD is measured with skip 0 (its select
step and sparse steps come first) and projected with the default skip 0.2 (52 dense steps, one
select step, 203 sparse steps). Each length starts with three untimed steps (dense, select,
sparse) at its shape. Results go to `gpu_vllm_race.json` in --out after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GEN, BLOCK, STEPS = 256, 32, 256
KV_CACHE_BYTES = int(os.environ.get("SPARSED_KV_CACHE_GIB", "40")) * 2**30
MODES = {
    "exact dense": {"sparsed": False},
    "exact SparseD": {"sparsed": True},
    "dual": {"cache": "dual", "sparsed": False},
    "dual + SparseD": {"cache": "dual", "sparsed": True},
}


def step_kinds(prompt_len: int, extra: dict, mask_id: int) -> list[str]:
    """The kind of every step of a request, from its plan (random logits: the fixed-step commit
    rule does not depend on them)."""
    from sparsed_vllm.core.params import LLADA, resolve_params
    from sparsed_vllm.core.request import DiffusionRequest
    from sparsed_vllm.core.sparsed import SparsedConfig, resolve_sparsed

    params = resolve_params(LLADA, extra, max_tokens=GEN)
    settings = resolve_sparsed(SparsedConfig(), extra, prompt_len + GEN)
    request = DiffusionRequest([1] * prompt_len, params, mask_id, settings)
    kinds = []
    while not request.finished:
        plan = request.plan()
        where = "cached" if plan.cached else "refresh" if plan.store_kv else "full"
        kinds.append(f"{where} {plan.stage}")
        request.advance(torch.rand(1, plan.logit_rows.numel(), 16))
    return kinds


def make_engine(model: Path, max_len: int, **overrides):
    """An in-process engine (one `step()` is one denoising step) on vLLM's random weights."""
    from vllm import EngineArgs, LLMEngine

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    options = dict(
        model=str(model),
        dtype="bfloat16",
        load_format="dummy",
        enforce_eager=True,
        compilation_config={"custom_ops": ["none"]},
        max_model_len=max_len,
        max_num_batched_tokens=max_len,
        max_num_seqs=2,
        seed=0,
        gpu_memory_utilization=0.5,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
    )
    return LLMEngine.from_engine_args(EngineArgs(**{**options, **overrides}))


def run_steps(engine, prompt: list[int], extra: dict, limit: int | None, tag: str) -> list[float]:
    """Seconds of each engine step of one request (stopped after `limit` steps)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True, extra_args=extra)
    engine.add_request(tag, {"prompt_token_ids": prompt}, sp)
    times = []
    while engine.has_unfinished_requests():
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if limit is not None and len(times) >= limit:
            engine.abort_request([tag])
            while engine.has_unfinished_requests():
                engine.step()
    return times


def summarise(kinds: list[str], times: list[float]) -> dict:
    by_kind: dict[str, list[float]] = {}
    for kind, seconds in zip(kinds, times, strict=False):
        by_kind.setdefault(kind, []).append(seconds)
    return {
        kind: {"steps": len(v), "total_s": sum(v), "median_s": statistics.median(v)}
        for kind, v in by_kind.items()
    }


def race(
    engine, length: int, exact_steps: int, mask_id: int, seed: int, modes: list[str], repeat: int
) -> dict:
    """Every mode of `modes` at one length; the measured-whole modes `repeat` times, in turn
    (`total_s` is then their median, `total_s_runs` each run)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 100000, (length - GEN,), generator=g).tolist()
    base = {"steps": STEPS, "block_length": BLOCK}
    result = {"L": length}
    medians: dict[str, tuple[int, float]] = {}  # step kind of the exact modes -> (samples, s)
    # Untimed: a dense, a select and a sparse step at this length (cuDNN plans its attention per
    # shape on first use; Triton specialises some launches on the length).
    warm = {**base, "sparsed": True, "sparsed_skip": 0.0}
    run_steps(engine, prompt, warm, 3, f"warm-{length}")
    runs = [(name, r) for r in range(repeat) for name in modes]
    runs = [(n, r) for n, r in runs if r == 0 or "cache" in MODES[n]]
    for name, turn in runs:
        mode = MODES[name]
        extra = {**base, **mode}
        full_kinds = step_kinds(len(prompt), extra, mask_id)
        exact = "cache" not in mode
        measured = {**extra, "sparsed_skip": 0.0} if exact and mode["sparsed"] else extra
        kinds = step_kinds(len(prompt), measured, mask_id)
        limit = exact_steps if exact else None
        times = run_steps(engine, prompt, measured, limit, f"{name}-{turn}")
        if not exact and len(times) != len(kinds):
            raise RuntimeError(f"{name}: {len(times)} engine steps, plan says {len(kinds)}")
        stats = summarise(kinds, times)
        row = {"measured_steps": len(times), "kinds": stats}
        if exact:
            # Every step of a kind runs the whole sequence: project from the medians (of the
            # mode with the most samples of that kind: "full dense" comes from exact dense).
            for kind, s in stats.items():
                if s["steps"] > medians.get(kind, (0, 0.0))[0]:
                    medians[kind] = (s["steps"], s["median_s"])
            row["projected_s"] = sum(medians[k][1] for k in full_kinds)
        else:
            row["total_s"] = sum(times)
        row["schedule"] = {k: full_kinds.count(k) for k in dict.fromkeys(full_kinds)}
        if turn:
            first = result[name]
            first["total_s_runs"] = first.get("total_s_runs", [first["total_s"]]) + [sum(times)]
            first["total_s"] = statistics.median(first["total_s_runs"])
            first.setdefault("kinds_runs", [first["kinds"]]).append(stats)
            row = first
        result[name] = row
        seconds = row.get("total_s", row.get("projected_s"))
        label = "measured" if not exact else f"projected from {len(times)} steps"
        seconds = sum(times) if not exact else seconds
        print(f"L={length} {name}: {seconds:.1f} s ({label}); {stats}", flush=True)
    return result


def warm_up(engine, mask_id: int) -> None:
    """Every kernel variant the race uses, compiled on a short request (Triton compiles per
    launch shape; those must not land in the timings)."""
    from vllm import SamplingParams

    prompt = list(range(10, 4000))
    short = {"steps": 8, "block_length": BLOCK, "sparsed_skip": 0.0}
    for i, mode in enumerate(MODES.values()):
        extra = {**short, **mode}
        sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, extra_args=extra)
        engine.add_request(f"warm-{i}", {"prompt_token_ids": prompt}, sp)
        while engine.has_unfinished_requests():
            engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--work", default="/tmp/sparsed-race")
    parser.add_argument("--lengths", default="16384,32768,65536")
    parser.add_argument("--exact-steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated MODES names")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each dual mode, in turn")
    parser.add_argument(
        "--runner", type=json.loads, default={}, help='runner settings, e.g. {"cuda_graphs": true}'
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    model = Path(args.work) / "llada-race"
    cmd = [sys.executable, "-m", "sparsed_vllm.checkpoint", "--arch", "llada", "--out", str(model)]
    cmd += ["--preset", "full", "--layers", str(args.layers), "--max-len", str(max(lengths))]
    subprocess.run(cmd + ["--no-weights"], check=True, stdout=subprocess.DEVNULL)
    mask_id = json.loads((model / "config.json").read_text())["mask_token_id"]
    report = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "argv": sys.argv[1:],
        "shape": {"layers": args.layers, "gen": GEN, "block": BLOCK, "steps": STEPS},
        "runner": args.runner,
        "races": [],
    }
    engine = make_engine(model, max(lengths), additional_config={"runner": args.runner})
    warm_up(engine, mask_id)
    for i, length in enumerate(lengths):
        modes = args.modes.split(",")
        race_row = race(engine, length, args.exact_steps, mask_id, i, modes, args.repeat)
        report["races"].append(race_row)
        (out / "gpu_vllm_race.json").write_text(json.dumps(report, indent=1))
    engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
