"""Per-architecture config hook: makes `LLM(model=<LLaDA or Dream dir>)` need no extra flags.

Why it exists: vLLM calls `MODELS_CONFIG_MAP[arch].verify_and_update_config` from
`VllmConfig.__post_init__` before the platform fills `worker_cls` and before the async-scheduling
default is chosen, which is the one place a plugin can switch the worker, the scheduler and the
request validator for an architecture. Remove when vLLM has a public hook for that. It is also
before vLLM picks its compilation mode, which decides whether its fused custom ops run (below).
"""

from __future__ import annotations

from typing import Any

from vllm.config import CompilationMode, ModelConfig, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessor

from sparsed_vllm.core.params import DREAM, LLADA, diffusion_defaults, family_of, resolve_params
from sparsed_vllm.core.sparsed import SparsedConfig, resolve_sparsed
from sparsed_vllm.vllm_glue.serving import install_canvas_length_check, install_strict_max_tokens

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares its handlers

_GLUE = "sparsed_vllm.vllm_glue"
SCHEDULER_CLS = f"{_GLUE}.scheduler.DiffusionScheduler"
CPU_WORKER_CLS = f"{_GLUE}.worker.DiffusionCPUWorker"
GPU_WORKER_CLS = f"{_GLUE}.worker.DiffusionGPUWorker"


def generation_defaults(model_config: ModelConfig) -> dict[str, Any]:
    """Diffusion defaults (steps, block_length, alg, ...) from the generation config."""
    return diffusion_defaults(model_config.try_get_generation_config())


def unsupported_sampling_options(sp: SamplingParams) -> list[str]:
    """SamplingParams that diffusion decoding does not implement, by name."""
    checks = {
        "presence_penalty": sp.presence_penalty != 0,
        "frequency_penalty": sp.frequency_penalty != 0,
        "repetition_penalty": sp.repetition_penalty != 1,
        "min_p": sp.min_p > 0,
        "min_tokens": sp.min_tokens > 0,
        "logit_bias": bool(sp.logit_bias),
        "logprobs": sp.logprobs is not None,
        "prompt_logprobs": sp.prompt_logprobs is not None,
        "bad_words": bool(sp.bad_words),
        "allowed_token_ids": bool(sp.allowed_token_ids),
        "structured_outputs": sp.structured_outputs is not None,
    }
    return [name for name, bad in checks.items() if bad]


class _DiffusionRequestValidator(LogitsProcessor):
    """Checks each request in the API front end, so bad input fails there with a clear message.

    vLLM calls `validate_params` of the configured logits processors for every request before it
    reaches the engine (HTTP 400 from the server). It is never instantiated: the diffusion model
    runner samples by itself.
    """

    family = LLADA
    defaults: dict[str, Any] = {}
    sparsed_config = SparsedConfig()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        unsupported = unsupported_sampling_options(sampling_params)
        if unsupported:
            raise ValueError(
                f"sampling option(s) not supported by diffusion decoding: {', '.join(unsupported)}"
            )
        resolve_sparsed(cls.sparsed_config, sampling_params.extra_args, seq_len=None)
        if sampling_params.max_tokens is None:
            return
        resolve_params(
            cls.family,
            sampling_params.extra_args,
            max_tokens=sampling_params.max_tokens,
            temperature=sampling_params.temperature,
            top_p=sampling_params.top_p,
            top_k=sampling_params.top_k,
            defaults=cls.defaults,
        )


class LLaDARequestValidator(_DiffusionRequestValidator):
    family = LLADA


class DreamRequestValidator(_DiffusionRequestValidator):
    family = DREAM


_VALIDATORS = {LLADA: LLaDARequestValidator, DREAM: DreamRequestValidator}


def _v2_validator(validator: type) -> type:
    """The validator as a subclass of the V2 model runner's LogitsProcessor as well.

    Why: with the V2 runner on (the CUDA default in 0.32) the front end loads logits processors
    through `vllm.v1.worker.gpu.sample.logits_processor`, which accepts only its own base class.
    The class is a module attribute (see `__getattr__`) so a spawned process can unpickle it.
    Remove when vLLM has one LogitsProcessor interface.
    """
    name = f"{validator.__name__}V2"
    if name not in globals():
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Processor

        globals()[name] = type(name, (validator, V2Processor), {"__module__": __name__})
    return globals()[name]


def __getattr__(name: str) -> type:
    for validator in _VALIDATORS.values():
        if name == f"{validator.__name__}V2":
            return _v2_validator(validator)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        cache = vllm_config.cache_config
        cache.enable_prefix_caching = False
        if current_platform.is_cpu() and cache.kv_cache_memory_bytes is None:
            # No KV cache is allocated; without an explicit size the CPU worker refuses to start
            # unless 92% of the node's memory is free.
            cache.kv_cache_memory_bytes = 0
        # Every step runs the whole sequence, twice under classifier-free guidance.
        budget = max(scheduler.max_num_batched_tokens, 2 * model_config.max_model_len)
        scheduler.max_num_batched_tokens = budget
        if scheduler.max_num_scheduled_tokens is not None:
            scheduler.max_num_scheduled_tokens = max(scheduler.max_num_scheduled_tokens, budget)

        family = family_of(model_config.architecture)
        validator = _VALIDATORS[family]
        validator.defaults = generation_defaults(model_config)
        # Bad --additional-config fails here, at start-up, with the setting's name.
        validator.sparsed_config = SparsedConfig.from_additional_config(
            vllm_config.additional_config
        )
        if vllm_config.use_v2_model_runner:
            validator = _v2_validator(validator)
        processors = list(model_config.logits_processors or [])
        if validator not in processors:
            processors.append(validator)
        model_config.logits_processors = processors
        install_strict_max_tokens()
        install_canvas_length_check()
        logger.info(
            "sparsed-vllm: diffusion decoding for %s (worker %s, scheduler %s)",
            model_config.architecture,
            parallel.worker_cls,
            scheduler.scheduler_cls,
        )
