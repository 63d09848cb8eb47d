"""Request admission for one engine: its limits from the vLLM config, checks on SamplingParams.

Why it exists: the vLLM-free checks (`core.admission`) need the engine's model shape, attention
backend and budgets, which live in `VllmConfig`, and the request fields, which live in vLLM's
`SamplingParams`. The front end (`serving.install_request_checks`) and the scheduler both admit
through here, with limits built from their own engine's config (no state shared between engines).
vLLM internals used (0.32): `VllmConfig` fields, `ModelConfig.get_num_layers` /
`get_num_attention_heads` / `get_head_size` / `try_get_generation_config`, `SamplingParams` fields.
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams

from sparsed_vllm.core.admission import Admission, EngineLimits, admit
from sparsed_vllm.core.capabilities import select_backend
from sparsed_vllm.core.errors import ParameterError
from sparsed_vllm.core.params import (
    DEFAULT_MAX_TOKENS,
    DecodingConfig,
    diffusion_defaults,
    family_of,
)
from sparsed_vllm.core.sparsed import SparsedConfig


def engine_limits(vllm_config: VllmConfig) -> EngineLimits:
    """The limits of the engine `vllm_config` describes; ValueError for bad plugin settings."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    scheduler = vllm_config.scheduler_config
    step_tokens = scheduler.max_num_scheduled_tokens or scheduler.max_num_batched_tokens
    cache = vllm_config.cache_config
    # Known once the engine has sized its KV cache (vLLM keeps one block as its null block).
    capacity = (cache.num_gpu_blocks - 1) * cache.block_size if cache.num_gpu_blocks else None
    # Read from disk once per engine: diffusion defaults (steps, block_length, alg, ...) and
    # the canvas of a request that sends no max_tokens.
    generation = model.try_get_generation_config()
    return EngineLimits(
        family=family_of(model.architecture),
        defaults=diffusion_defaults(generation),
        sparsed=SparsedConfig.from_additional_config(vllm_config.additional_config),
        backend=select_backend(
            vllm_config.device_config.device_type, model.dtype, model.get_head_size()
        ),
        max_model_len=model.max_model_len,
        max_step_tokens=step_tokens,
        num_layers=model.get_num_layers(parallel),
        num_heads=model.get_num_attention_heads(parallel),
        decoding=DecodingConfig.from_additional_config(vllm_config.additional_config),
        kv_page_size=cache.block_size,
        kv_capacity_tokens=capacity,
        default_max_tokens=generation.get("max_new_tokens") or DEFAULT_MAX_TOKENS,
    )


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


def admit_request(
    limits: EngineLimits, sp: SamplingParams, prompt_len: int, seed: int | None = None
) -> Admission:
    """Admit a request; ParameterError names the field. `seed` replaces an unset `sp.seed`."""
    unsupported = unsupported_sampling_options(sp)
    if unsupported:
        raise ParameterError(
            unsupported[0],
            f"sampling option(s) not supported by diffusion decoding: {', '.join(unsupported)}",
        )
    if sp.max_tokens is None:
        raise ParameterError("max_tokens", "max_tokens (the canvas length) must be set")
    return admit(
        limits,
        prompt_len=prompt_len,
        max_tokens=sp.max_tokens,
        extra_args=sp.extra_args,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        seed=sp.seed if sp.seed is not None else (seed or 0),
    )


def field_value(sp: SamplingParams, name: str) -> Any:
    """What the request sent for `name` (an extra_args key or a SamplingParams field)."""
    extra = sp.extra_args or {}
    return extra[name] if name in extra else getattr(sp, name, None)
