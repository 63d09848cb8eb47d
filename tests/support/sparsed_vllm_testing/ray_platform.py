"""Test-only `vllm.platform_plugins` entry point: lets CPU CI run tensor parallelism through Ray.

Why it exists: vLLM's CPU platform declares no Ray device key, so `distributed_executor_backend=
"ray"` fails on it ("current platform cpu does not support ray"), yet the Ray path (actors that
load this plugin through its entry point, the scheduler's metadata pickled to every rank) is what
multi-GPU deployments run and must be tested without a GPU. It does nothing unless
`SPARSED_VLLM_TEST_RAY_PLATFORM=1` is set, and it is installed only into test environments
(scripts/run_tests.sh): on a GPU machine it would replace the CUDA platform with the CPU one.

This module is imported while vLLM resolves its platform, so it imports nothing from vLLM; the
platform class lives in `ray_cpu_platform`.
"""

from __future__ import annotations

import os

ENV = "SPARSED_VLLM_TEST_RAY_PLATFORM"
PLATFORM_CLS = "sparsed_vllm_testing.ray_cpu_platform.RayCpuPlatform"


def activate() -> str | None:
    """The platform class vLLM should use, or None (inactive) unless the test variable is set."""
    return PLATFORM_CLS if os.environ.get(ENV) == "1" else None
