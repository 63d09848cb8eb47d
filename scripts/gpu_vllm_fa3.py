"""The dense cached steps through vLLM's FlashAttention-3 build (`runner.cached_kernel: "fa3"`)
against our Triton kernel, inside the engine, on a Hopper GPU.

    FA3_SO=.gpu_fa3/_vllm_fa3_C.abi3.so.xz \
        bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_fa3.py --out out [--length 32768]

(`FA3_SO` puts the build, from scripts/gpu_fa3_bundle.sh, where a CUDA install of vLLM has it.)

The setting of `scripts/gpu_vllm_graphs.py` (LLaDA-8B shape, random weights, one request of
`--length` tokens, 256 new tokens, blocks of 32, T = 256) on the dual cache, without and with
SparseD (whose dense cached steps take FA3 and sparse ones stay ours), one engine per kernel,
both with cached steps replayed as CUDA graphs (eager cached steps are bound by the host, which
hides a kernel's gain) unless `--eager`. Writes `gpu_vllm_fa3.json` in --out: step times by kind
and whether the tokens match.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm_graphs import MODES, compare, parse_args  # noqa: E402

if __name__ == "__main__":
    args = parse_args(eager_option=True)
    graphs = {"cuda_graphs": not args.eager}
    runners = {
        "triton": {**graphs, "cached_kernel": "triton"},
        "fa3": {**graphs, "cached_kernel": "fa3"},
    }
    compare(args, runners, MODES, "gpu_vllm_fa3")
