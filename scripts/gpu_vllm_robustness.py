"""Requests and models the CUDA kernels cannot run, through `vllm.LLM` on a GPU (issue 13 re-run).

    bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_robustness.py --out out

1. bf16, head_dim 128 (Triton backend): a request with `sparsed_block_size` 256 (the kernels stop
   at 128) is refused with VLLMValidationError naming the field, and the engine then serves a
   SparseD request with tiles of 128. Before the capability table it killed the engine.
2. bf16, head_dim 32 (the kernels take 64 and 128): the engine starts with a warning, runs on the
   exact path and serves dense and forced-SparseD requests. Before, the first selection step
   raised inside the engine.
Writes `robustness.json` to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def write_checkpoint(out: Path, hidden: int, heads: int) -> Path:
    cmd = [sys.executable, "-m", "sparsed_vllm.checkpoint", "--arch", "llada", "--out", str(out)]
    cmd += ["--preset", "small", "--hidden", str(hidden), "--heads", str(heads)]
    cmd += ["--kv-heads", str(heads), "--dtype", "bfloat16"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def make_llm(model: Path):
    import vllm

    return vllm.LLM(
        model=str(model),
        dtype="bfloat16",
        enforce_eager=True,
        compilation_config={"custom_ops": ["none"]},
        max_model_len=2048,
        max_num_seqs=4,
        seed=0,
        gpu_memory_utilization=0.5,
    )


def run(llm, extra: dict) -> dict:
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    params = SamplingParams(
        max_tokens=64,
        temperature=0,
        ignore_eos=True,
        extra_args={"steps": 16, "block_length": 32, "sparsed": True, **extra},
    )
    prompt = {"prompt_token_ids": list(range(3, 1500))}
    try:
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    except VLLMValidationError as exc:
        return {"refused": True, "parameter": exc.parameter, "message": str(exc)}
    return {"refused": False, "tokens": len(out.token_ids)}


def backend_of(llm) -> str:
    from sparsed_vllm.core.capabilities import select_backend

    config = llm.llm_engine.vllm_config
    model = config.model_config
    return select_backend(config.device_config.device_type, model.dtype, model.get_head_size()).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/robustness"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, hidden, heads in (("head_dim_128", 1024, 8), ("head_dim_32", 256, 8)):
        llm = make_llm(write_checkpoint(args.work / name, hidden, heads))
        case = {"backend": backend_of(llm)}
        case["tile_256"] = run(llm, {"sparsed_block_size": 256})
        case["tile_128_after"] = run(llm, {"sparsed_block_size": 128})
        case["tile_32"] = run(llm, {"sparsed_block_size": 32})
        case["dense"] = run(llm, {"sparsed": False})
        results[name] = case
        print(name, json.dumps(case), flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
    (args.out / "robustness.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
