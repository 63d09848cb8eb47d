"""Per-architecture config hook: makes `LLM(model=<LLaDA or Dream dir>)` need no extra flags.

Why it exists: vLLM calls `MODELS_CONFIG_MAP[arch].verify_and_update_config` from
`VllmConfig.__post_init__` before the platform fills `worker_cls` and before the async-scheduling
default is chosen, which is the one place a plugin can switch the worker and the scheduler for an
architecture and install its request checks. Remove when vLLM has a public hook for that. It is also
before vLLM picks its compilation mode, which decides whether its fused custom ops run (below).
"""

from __future__ import annotations

from vllm.config import CompilationMode, CUDAGraphMode, ModelConfig, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from sparsed_vllm.core.capabilities import fallback_reason
from sparsed_vllm.core.params import VENDOR_KERNELS, RunnerConfig
from sparsed_vllm.vllm_glue.admission import engine_limits
from sparsed_vllm.vllm_glue.metrics import install_exporter
from sparsed_vllm.vllm_glue.serving import (
    in_api_server,
    install_request_checks,
    install_strict_max_tokens,
)

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares its handlers

_GLUE = "sparsed_vllm.vllm_glue"
SCHEDULER_CLS = f"{_GLUE}.scheduler.DiffusionScheduler"
CPU_WORKER_CLS = f"{_GLUE}.cpu_worker.DiffusionCPUWorker"
GPU_WORKER_CLS = f"{_GLUE}.worker.DiffusionGPUWorker"
KV_PAGE_SIZE = 128
CPU_KV_CACHE_BYTES = 2**30


class DiffusionLMConfig(VerifyAndUpdateConfig):
    """Switches a LLaDA/Dream engine to diffusion decoding."""

    @staticmethod
    def verify_and_update_model_config(model_config: ModelConfig) -> None:
        # Bidirectional attention everywhere; read by code that asks the HF config.
        model_config.hf_config.is_causal = False

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        from vllm.platforms import current_platform

        model_config = vllm_config.model_config
        parallel = vllm_config.parallel_config
        scheduler = vllm_config.scheduler_config
        if parallel.pipeline_parallel_size > 1:
            raise ValueError(
                "pipeline parallelism is not supported for diffusion LMs "
                f"(pipeline_parallel_size={parallel.pipeline_parallel_size}); use tensor "
                "parallelism"
            )
        if parallel.worker_cls == "auto":
            parallel.worker_cls = CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
        if scheduler.scheduler_cls is None:
            scheduler.scheduler_cls = SCHEDULER_CLS
        # One step must finish before the next is planned (the canvas changes every step).
        scheduler.async_scheduling = False
        scheduler.enable_chunked_prefill = False
        compilation = vllm_config.compilation_config
        if compilation.mode is None:
            # The diffusion runner calls the model eagerly (no torch.compile, no CUDA graphs: the
            # canvas length changes with every request mix). Left to vLLM, the default compile
            # mode would also switch vLLM's fused custom ops (RMSNorm + residual add, RoPE,
            # SiLU-and-mul) off in favour of an Inductor pass that never runs here, leaving them
            # as unfused torch ops. An explicit mode or `custom_ops` from the user is kept.
            compilation.mode = CompilationMode.NONE
        if compilation.cudagraph_mode is None:
            # The runner captures no vLLM CUDA graphs (the batch shape changes every step).
            compilation.cudagraph_mode = CUDAGraphMode.NONE
        cache = vllm_config.cache_config
        cache.enable_prefix_caching = False
        if not cache.user_specified_block_size:
            # One KV page per SparseD tile of the default size (128): cached steps then read
            # whole pages, and kept key tiles map to pages one to one.
            cache.block_size = KV_PAGE_SIZE
        if current_platform.is_cpu() and cache.kv_cache_memory_bytes is None:
            # The CPU worker needs an explicit KV size (it otherwise requires 92% of the node's
            # memory to be free); cached decoding keeps K/V there, exact decoding needs none.
            cache.kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        # Every step runs the whole sequence, twice under classifier-free guidance.
        budget = max(scheduler.max_num_batched_tokens, 2 * model_config.max_model_len)
        scheduler.max_num_batched_tokens = budget
        if scheduler.max_num_scheduled_tokens is not None:
            scheduler.max_num_scheduled_tokens = max(scheduler.max_num_scheduled_tokens, budget)

        # Bad --additional-config, or a tile the engine's kernels cannot run, fails here at
        # start-up with the setting's name.
        limits = engine_limits(vllm_config)
        runner = RunnerConfig.from_additional_config(vllm_config.additional_config)
        for option, (name, gpus) in VENDOR_KERNELS.items():
            if getattr(runner, option) == name and vllm_config.device_config.device_type != "cuda":
                raise ValueError(f"runner.{option} '{name}' needs a CUDA GPU ({gpus})")
        reason = fallback_reason(
            vllm_config.device_config.device_type, model_config.dtype, model_config.get_head_size()
        )
        if reason:
            logger.warning("sparsed-vllm: %s", reason)
        install_request_checks()
        install_strict_max_tokens()
        if in_api_server():
            install_exporter()
        logger.info(
            "sparsed-vllm: diffusion decoding for %s (worker %s, scheduler %s, %s attention)",
            model_config.architecture,
            parallel.worker_cls,
            scheduler.scheduler_cls,
            limits.backend.name,
        )
