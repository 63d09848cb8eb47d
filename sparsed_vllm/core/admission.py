"""Admission: everything about a request that can fail is decided here, before it runs a step.

The API front end calls `admit` on every request (a failure is an HTTP 400 / vLLM validation
error naming the field) and the scheduler calls it again when the request arrives, so nothing
a step computes can fail on user input. No vLLM import: the glue builds `EngineLimits` from the
engine's config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sparsed_vllm.core.capabilities import Backend
from sparsed_vllm.core.errors import ParameterError
from sparsed_vllm.core.params import (
    DEFAULT_MAX_TOKENS,
    DecodingConfig,
    DiffusionParams,
    resolve_params,
)
from sparsed_vllm.core.sparsed import SparsedConfig, SparsedSettings, pattern_bytes, resolve_sparsed


@dataclass(frozen=True)
class EngineLimits:
    """What one engine can run (one per engine: nothing here is shared between engines)."""

    family: str
    # Diffusion defaults from the checkpoint's generation config (steps, alg, ...).
    defaults: dict[str, Any]
    sparsed: SparsedConfig
    # The attention backend the engine's layers dispatch to (capability table).
    backend: Backend
    max_model_len: int
    # Tokens one engine step may run (vLLM's max_num_batched_tokens).
    max_step_tokens: int
    # Per tensor-parallel rank: pattern memory is accounted per worker.
    num_layers: int
    num_heads: int
    decoding: DecodingConfig = DecodingConfig()
    # Tokens per KV-cache page (vLLM's KV block), and how many tokens the whole KV cache holds
    # (None until the engine has sized it: the front end learns it once the engine is up).
    kv_page_size: int = 128
    kv_capacity_tokens: int | None = None
    # Canvas of an offline request without max_tokens (the checkpoint's max_new_tokens).
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        # Plugin-wide settings must be ones this engine's kernels run (fails at start-up).
        self.backend.check_tile("sparsed.block_size", self.sparsed.block_size)
        self.backend.check_page_size(self.kv_page_size)
        try:
            self.backend.check_cache(self.decoding.cache)
        except ParameterError as exc:
            raise ValueError(f"decoding.{exc}") from None


@dataclass(frozen=True)
class Admission:
    """A request that passed every check, with what the scheduler budgets for it."""

    params: DiffusionParams
    sparsed: SparsedSettings
    seq_len: int  # prompt + canvas
    step_tokens: int  # tokens its first step runs through the model (x2 under CFG)
    pattern_bytes: int  # SparseD pattern memory per worker (0 when it never goes sparse)
    kv_tokens: int  # KV-cache slots it holds while it runs (0 for cache "none")


def admit(
    limits: EngineLimits,
    *,
    prompt_len: int,
    max_tokens: int,
    extra_args: dict[str, Any] | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> Admission:
    """Resolve and check one request; ParameterError names the first bad field."""
    if prompt_len < 1:
        raise ParameterError("prompt", "the prompt must contain at least one token")
    params = resolve_params(
        limits.family,
        extra_args,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        defaults=limits.defaults,
        decoding=limits.decoding,
    )
    limits.backend.check_cache(params.cache)
    seq_len = prompt_len + params.gen_length
    if seq_len > limits.max_model_len:
        raise ParameterError(
            "max_tokens",
            f"prompt ({prompt_len} tokens) + max_tokens ({params.gen_length}) = {seq_len} exceeds "
            f"the model length {limits.max_model_len}; a diffusion LM's canvas is exactly "
            "max_tokens long, so lower max_tokens or shorten the prompt",
        )
    step_tokens = seq_len * params.num_sequences
    if step_tokens > limits.max_step_tokens:
        raise ParameterError(
            "max_tokens",
            f"one step of this request runs {step_tokens} tokens, more than "
            f"max_num_batched_tokens={limits.max_step_tokens}",
        )
    kv_tokens = _kv_tokens(limits, params, seq_len)
    sparsed = resolve_sparsed(limits.sparsed, extra_args, seq_len, limits.backend)
    if params.cache != "none" and sparsed.enabled and not limits.backend.cached_sparse:
        if (extra_args or {}).get("sparsed"):
            raise ParameterError(
                "sparsed",
                f"SparseD with cache {params.cache!r} is not run by the {limits.backend.name} "
                "attention backend; send sparsed false, or cache 'none' for SparseD",
            )
        # The plugin-wide SparseD then applies to this engine's cache "none" requests only.
        sparsed = replace(sparsed, enabled=False)
    cost = 0
    if sparsed.goes_sparse(params.steps):
        cost = pattern_bytes(
            seq_len,
            params.gen_length,
            sparsed,
            num_layers=limits.num_layers,
            num_heads=limits.num_heads,
            num_sequences=params.num_sequences,
        )
        if cost > limits.sparsed.pattern_pool_bytes:
            raise ParameterError(
                "sparsed",
                f"SparseD patterns of this request need {cost / 2**20:.1f} MiB, more than the "
                f"whole pattern pool ({limits.sparsed.pattern_pool_mb} MiB); raise "
                "sparsed.pattern_pool_mb or send sparsed=false",
            )
    return Admission(params, sparsed, seq_len, step_tokens, cost, kv_tokens)


def _kv_tokens(limits: EngineLimits, params: DiffusionParams, seq_len: int) -> int:
    """KV slots a cached request holds (its whole sequence); refused if the cache cannot hold it."""
    if params.cache == "none":
        return 0
    capacity = limits.kv_capacity_tokens
    if capacity is not None and seq_len > capacity:
        raise ParameterError(
            "cache",
            f"cache {params.cache!r} keeps K/V for the whole sequence ({seq_len} tokens), more "
            f"than the engine's KV cache holds ({capacity} tokens); send cache 'none', a shorter "
            "request, or start the engine with more memory for the KV cache",
        )
    return seq_len
