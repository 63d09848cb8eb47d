"""SparseD's sparse steps through FlashAttention-4 (`runner.sparse_kernel: "fa4"`) against the
Triton kernel, inside the engine, on a GPU.

    bash scripts/gpu_fa4_stage.sh     # the CuTe DSL into /tmp/fa4-site
    PYTHONPATH=/tmp/fa4-site:/tmp/fa4-site/nvidia_cutlass_dsl/dsl_packages \
        bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_fa4.py --out out [--length 16384]

(vLLM's own `vllm_flash_attn.cute` comes from the vLLM bundle, which goes first on the path.)

The setting of `scripts/gpu_vllm_graphs.py` (LLaDA-8B shape, random weights, one request of
`--length` tokens, 256 new tokens, blocks of 32, T = 256), with SparseD alone (the published
loop: 52 dense steps, then sparse) and on the dual cache (its sparse refreshes), one engine per
kernel. Writes `gpu_vllm_fa4.json` in --out: step times by kind and whether the tokens match.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vllm_graphs import compare, parse_args  # noqa: E402

MODES = {
    "SparseD": {"sparsed": True},
    "dual + SparseD": {"cache": "dual", "sparsed": True},
}

if __name__ == "__main__":
    runners = {"triton": {"sparse_kernel": "triton"}, "fa4": {"sparse_kernel": "fa4"}}
    compare(parse_args(), runners, MODES, "gpu_vllm_fa4")
