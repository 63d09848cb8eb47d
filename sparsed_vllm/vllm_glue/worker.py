"""The GPU worker that runs the diffusion model runner instead of vLLM's autoregressive one.

Why it exists: the GPU Worker offers `_make_model_runner()` as its override point. The CPU worker
lives in `cpu_worker.py`: importing vLLM's CPU worker replaces `torch.cuda.Stream`, `stream`,
`current_stream` and `Event` with placeholders process-wide (`vllm/v1/worker/cpu/shm.py`), which
breaks CUDA graph capture and CUDA events on a GPU, so this module must not import it.
"""

from __future__ import annotations

from vllm.utils.torch_utils import set_random_seed
from vllm.v1.worker.gpu_worker import Worker
from vllm.v1.worker.worker_base import CompilationTimes

from sparsed_vllm.vllm_glue.model_runner import DiffusionModelRunner


def compilation_times(worker) -> CompilationTimes:
    return CompilationTimes(
        language_model=worker.compilation_config.compilation_time,
        encoder=worker.compilation_config.encoder_compilation_time,
    )


class DiffusionGPUWorker(Worker):
    def _make_model_runner(self) -> DiffusionModelRunner:
        return DiffusionModelRunner(self.vllm_config, self.device)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        # No CUDA graphs: sequence lengths change with every request mix.
        self.model_runner.warming_up_model()
        set_random_seed(self.model_config.seed)
        return compilation_times(self)
