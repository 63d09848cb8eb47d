"""vLLM's CPU platform, made usable with the Ray executor (tests only; see `ray_platform`).

Ray places vLLM's workers by a device resource. The CPU has none Ray knows, so this platform
claims a placeholder "GPU" resource ("CPU" does not work: vLLM would request it as a custom
resource) and, unless the caller chose otherwise, tells a Ray cluster started by vLLM that it has
one such "GPU" per rank. The workers (Ray actors) get the activation variable, so they resolve this
same platform, and one OpenMP thread each: two ranks of two threads on a two-core machine spin
against each other and decode about 50x slower. Only RayExecutorV2 (vLLM's default Ray executor)
is supported this way.
vLLM internals used (0.32): `CpuPlatform`, `Platform.ray_device_key`,
`ParallelConfig.ray_runtime_env`. Remove when vLLM's CPU platform supports Ray.
"""

from __future__ import annotations

import json
import os

from vllm.platforms.cpu import CpuPlatform

from sparsed_vllm_testing.ray_platform import ENV

# Applied to every Ray worker; a value the caller already put in ray_runtime_env wins.
ACTOR_ENV = {ENV: "1", "OMP_NUM_THREADS": "1"}


class RayCpuPlatform(CpuPlatform):
    ray_device_key: str = "GPU"

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        parallel = vllm_config.parallel_config
        if parallel.distributed_executor_backend != "ray":
            return
        # Read by the Ray cluster that vLLM starts when none is running; ignored when joining one
        # (start that with `ray start --num-gpus N`).
        os.environ.setdefault("RAY_OVERRIDE_RESOURCES", json.dumps({"GPU": parallel.world_size}))
        parallel.ray_runtime_env = _with_actor_env(parallel.ray_runtime_env)


def _with_actor_env(runtime_env):
    from ray.runtime_env import RuntimeEnv

    merged = dict(runtime_env or {})
    merged["env_vars"] = {**ACTOR_ENV, **merged.get("env_vars", {})}
    return RuntimeEnv(**merged)
