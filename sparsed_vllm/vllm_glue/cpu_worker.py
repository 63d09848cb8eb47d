"""The CPU worker that runs the diffusion model runner instead of vLLM's autoregressive one.

Why it exists: the CPU worker builds its runner inline in `init_device`, so this subclass repeats
that method's set-up (device, thread binding guard, distributed init, seed) around our runner.
Remove the copy when CPUWorker gains the GPU worker's `_make_model_runner()` override point.
Imported only for CPU engines: vLLM's CPU worker module patches torch.cuda process-wide (see
`worker.py`).
"""

from __future__ import annotations

import os

import torch
from vllm.platforms import current_platform
from vllm.utils.torch_utils import set_random_seed
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import init_worker_distributed_environment
from vllm.v1.worker.worker_base import CompilationTimes

from sparsed_vllm.vllm_glue.model_runner import DiffusionModelRunner
from sparsed_vllm.vllm_glue.worker import compilation_times


class DiffusionCPUWorker(CPUWorker):
    def init_device(self) -> None:
        self.device = torch.device("cpu")

        def skip_set_num_threads(_: int) -> None:
            return None

        # Threads are bound by the CPU worker; later set_num_threads calls must not undo it.
        torch.set_num_threads = skip_set_num_threads
        init_method = self.distributed_init_method
        os.environ["VLLM_DIST_IDENT"] = (
            os.path.basename(init_method.removeprefix("file://"))
            if init_method.startswith("file://")
            else init_method.split(":")[-1]
        )
        init_worker_distributed_environment(
            self.vllm_config,
            self.rank,
            self.distributed_init_method,
            self.local_rank,
            current_platform.dist_backend,
        )
        set_random_seed(self.model_config.seed)
        self.model_runner = DiffusionModelRunner(self.vllm_config, self.device)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        self.model_runner.warming_up_model()
        return compilation_times(self)
