"""Per-request diffusion-decoding parameters: defaults, validation, resolution.

No vLLM import: the same resolution runs in the API front end (to reject bad requests with a
clear message), in the scheduler (to plan steps) and in tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sparsed_vllm.core.errors import ParameterError

LLADA = "llada"
DREAM = "dream"
FAMILIES = (LLADA, DREAM)
REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")

CACHE_MODES = ("none", "prefix", "dual")
# Dream's cached decoding is blockwise (Fast-dLLM); its block length when the request sends none.
DREAM_BLOCK_LENGTH = 32

# extra_args keys per family; everything else in extra_args is rejected with its name.
# block_length is LLaDA's always and Dream's in its blockwise modes (cache or threshold/factor).
_COMMON_KEYS = ("steps", "block_length")
_LLADA_KEYS = ("remasking", "cfg_scale")
_DREAM_KEYS = ("alg", "alg_temp", "eps")
DIFFUSION_KEYS = _COMMON_KEYS + _LLADA_KEYS + _DREAM_KEYS
SPARSED_KEYS = ("sparsed", "sparsed_skip", "sparsed_select", "sparsed_block_size")
DECODING_KEYS = ("cache", "threshold", "factor")


@dataclass(frozen=True)
class DiffusionParams:
    """Everything one request's denoising loop needs, fully resolved.

    `gen_length` is the canvas length (the request's max_tokens). Dream's published decoding is
    one canvas, modelled as a single block (`block_length == gen_length`); its blockwise modes
    (a cache, threshold or factor) decode blocks of `block_length` like LLaDA.
    `cache`: "none" (every step runs the whole sequence), "prefix" or "dual" (Fast-dLLM: a full
    forward refreshes the K/V at each block's first step, later steps run only part of it).
    `threshold` / `factor`: parallel decoding, commit every confident token (at most one is set);
    the number of steps then depends on the model's confidence.
    """

    family: str
    gen_length: int
    steps: int
    block_length: int
    remasking: str = "low_confidence"
    alg: str = "origin"
    alg_temp: float = 0.0
    eps: float = 1e-3
    cfg_scale: float = 0.0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    cache: str = "none"
    threshold: float | None = None
    factor: float | None = None

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def num_sequences(self) -> int:
        """Sequences run per step: classifier-free guidance adds an unconditional copy."""
        return 2 if self.cfg_scale > 0 else 1

    @property
    def parallel(self) -> bool:
        """Threshold or factor decoding: a block ends when it has no [MASK] left."""
        return self.threshold is not None or self.factor is not None

    @property
    def blockwise_dream(self) -> bool:
        """Dream decoded block by block (Fast-dLLM's rules) rather than as one canvas."""
        return self.family == DREAM and (self.cache != "none" or self.parallel)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def family_of(architecture: str) -> str:
    """Map a checkpoint architecture name to its decoding family."""
    if architecture.startswith("LLaDA"):
        return LLADA
    if architecture.startswith("Dream"):
        return DREAM
    raise ValueError(f"architecture {architecture!r} is neither LLaDA nor Dream")


# Kernels of the sparse steps (`RunnerConfig.sparse_kernel`) and of the dense cached steps
# (`RunnerConfig.cached_kernel`).
SPARSE_KERNELS = ("auto", "triton", "fa4")
CACHED_KERNELS = ("auto", "triton", "fa3")
RUNNER_SETTINGS = ("cuda_graphs", "sparse_kernel", "cached_kernel")
# The vendor kernel each kernel setting may name, and the GPUs it needs: the start-up checks of
# the config hook (no CUDA GPU) and of the runner (not importable, wrong GPU) both read this.
VENDOR_KERNELS = {
    "sparse_kernel": ("fa4", "Hopper or Blackwell"),
    "cached_kernel": ("fa3", "Hopper"),
}


@dataclass(frozen=True)
class RunnerConfig:
    """How the diffusion runner executes steps (`--additional-config '{"runner": {...}}'`).

    `cuda_graphs`: capture the forward of a cached step once its layout repeats (the same
    requests, windows and stages: every step of a block after its second) and replay it, which
    removes the per-layer launch and Python overhead that bounds cached steps. Single GPU only
    (tensor parallelism keeps eager steps). Off by default until measured on every supported card.

    `sparse_kernel`: the kernel of SparseD's sparse steps on a GPU. "triton" (ours, any CUDA GPU),
    "fa4" (FlashAttention-4's block-sparse forward as vLLM ships it, `vllm.vllm_flash_attn.cute`:
    Hopper and Blackwell, tiles of a multiple of its 128-row query block, head size 64 or 128;
    other requests keep Triton; refused at start-up where it cannot run), or "auto" (default):
    FA4 on the GPUs where it measured faster than Triton (Hopper: 1.31-1.41x on an H200) and
    imports, Triton elsewhere (`kernels.block_sparse.fa4.default_sparse_kernel`).

    `cached_kernel`: the kernel of the dense cached steps (a block's query rows against all keys
    in the paged cache) on a GPU. "triton" (ours, any CUDA GPU), "fa3" (vLLM's FlashAttention-3
    build, `vllm.vllm_flash_attn`: Hopper only; refused at start-up where it cannot run), or
    "auto" (default): FA3 where it imports on Hopper, where it measured faster (1.75-3.3x at
    16k-64k keys on an H200), Triton elsewhere (`kernels.cached.fa3.default_cached_kernel`). The
    cached sparse steps always run ours (FA3 has no block sparsity).
    """

    cuda_graphs: bool = False
    sparse_kernel: str = "auto"
    cached_kernel: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"runner.cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.sparse_kernel not in SPARSE_KERNELS:
            raise ValueError(
                f"runner.sparse_kernel must be one of {SPARSE_KERNELS}, got {self.sparse_kernel!r}"
            )
        if self.cached_kernel not in CACHED_KERNELS:
            raise ValueError(
                f"runner.cached_kernel must be one of {CACHED_KERNELS}, got {self.cached_kernel!r}"
            )

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> RunnerConfig:
        section = (additional_config or {}).get("runner", {})
        if not isinstance(section, dict):
            raise ValueError(f"additional_config 'runner' must be an object, got {section!r}")
        unknown = sorted(set(section) - set(RUNNER_SETTINGS))
        if unknown:
            raise ValueError(
                f"unknown runner setting(s) {unknown}; supported: {', '.join(RUNNER_SETTINGS)}"
            )
        return cls(**section)


def diffusion_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The diffusion keys of a checkpoint's generation config (Dream ships steps/alg/...)."""
    return {k: generation_config[k] for k in DIFFUSION_KEYS if generation_config.get(k) is not None}


@dataclass(frozen=True)
class DecodingConfig:
    """Plugin-wide decoding defaults (`--additional-config '{"decoding": {...}}'`); a request
    overrides them with the same names in extra_args / vllm_xargs."""

    cache: str = "none"
    threshold: float | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        try:
            _decoding({"cache": self.cache, "threshold": self.threshold, "factor": self.factor})
        except ParameterError as exc:
            raise ValueError(f"decoding.{exc}") from None

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> DecodingConfig:
        section = (additional_config or {}).get("decoding", {})
        if not isinstance(section, dict):
            raise ValueError(f"additional_config 'decoding' must be an object, got {section!r}")
        unknown = sorted(set(section) - set(DECODING_KEYS))
        if unknown:
            raise ValueError(
                f"unknown decoding setting(s) {unknown}; supported: {', '.join(DECODING_KEYS)}"
            )
        return cls(**section)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _decoding(values: dict[str, Any]) -> dict[str, Any]:
    """Validated cache / threshold / factor (None: not set)."""
    cache = values.get("cache", "none")
    if cache not in CACHE_MODES:
        raise ParameterError("cache", f"cache must be one of {CACHE_MODES}, got {cache!r}")
    threshold, factor = values.get("threshold"), values.get("factor")
    if threshold is not None:
        threshold = real("threshold", threshold)
        if not 0 < threshold <= 1:
            raise ParameterError("threshold", f"threshold must be in (0, 1], got {threshold}")
    if factor is not None:
        factor = real("factor", factor)
        if factor <= 0:
            raise ParameterError("factor", f"factor must be > 0, got {factor}")
    if threshold is not None and factor is not None:
        raise ParameterError(
            "factor", "threshold and factor are alternative commit rules; send only one of them"
        )
    return {"cache": cache, "threshold": threshold, "factor": factor}


def _merge_decoding(defaults: DecodingConfig | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Request values over plugin defaults; a request naming threshold or factor replaces the
    plugin's commit rule (so a plugin-wide threshold and a request's factor do not clash)."""
    values = (defaults or DecodingConfig()).to_dict()
    if "threshold" in extra or "factor" in extra:
        values.update(threshold=None, factor=None)
    values.update({k: extra[k] for k in DECODING_KEYS if k in extra})
    return _decoding(values)


# torch.Generator.manual_seed takes these; larger seeds cannot even be sent to the engine.
SEED_RANGE = (-(2**63), 2**64 - 1)
# The canvas of a request that sends no max_tokens (an OpenAI chat request may omit it) and whose
# checkpoint's generation config sets no max_new_tokens: LLaDA's and SparseD's usual gen length.
DEFAULT_MAX_TOKENS = 128
# Dream divides confidences by alg_temp before a softmax; below this the quotient can overflow.
MIN_ALG_TEMP = 1e-4


def _integer(name: str, value: Any, low: int, high: int | None = None, note: str = "") -> int:
    """`value` as an int in [low, high]; integral floats (1e3) pass, bools and strings do not.

    `note` follows the name in messages, e.g. "(the checkpoint's default)".
    """
    label = f"{name} {note}" if note else name
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(name, f"{label} must be a number, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ParameterError(name, f"{label} must be an integer, got {value!r}")
    value = int(value)
    if value < low:
        raise ParameterError(name, f"{label} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ParameterError(name, f"{label} must be <= {high}, got {value}")
    return value


def real(name: str, value: Any) -> float:
    """`value` as a finite float; ParameterError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(name, f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ParameterError(name, f"{name} must be finite, got {value!r}") from None
    if not math.isfinite(value):
        raise ParameterError(name, f"{name} must be finite, got {value!r}")
    return value


def _check_keys(family: str, extra: dict[str, Any]) -> None:
    allowed = set(_COMMON_KEYS) | set(SPARSED_KEYS) | set(DECODING_KEYS)
    allowed |= set(_LLADA_KEYS if family == LLADA else _DREAM_KEYS)
    for key in extra:
        if key in allowed:
            continue
        if key in DIFFUSION_KEYS:
            raise ParameterError(key, f"extra_args {key!r} does not apply to {family} models")
        raise ParameterError(
            key, f"unknown extra_args key {key!r}; supported: {', '.join(sorted(allowed))}"
        )


def resolve_params(
    family: str,
    extra_args: dict[str, Any] | None,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    defaults: dict[str, Any] | None = None,
    decoding: DecodingConfig | None = None,
) -> DiffusionParams:
    """Merge request values over checkpoint and plugin defaults and validate; ParameterError
    names the offending field."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}")
    extra = dict(extra_args or {})
    _check_keys(family, extra)
    values = {k: v for k, v in (defaults or {}).items() if k in DIFFUSION_KEYS}
    if family == LLADA:
        values = {k: v for k, v in values.items() if k not in _DREAM_KEYS}
    else:
        values = {k: v for k, v in values.items() if k not in _LLADA_KEYS}
    values.update({k: v for k, v in extra.items() if k in DIFFUSION_KEYS})
    decoding_values = _merge_decoding(decoding, extra)

    gen_length = _integer("max_tokens", max_tokens, 1, note="(the generation length)")
    if temperature < 0:
        raise ParameterError("temperature", f"temperature must be >= 0, got {temperature}")
    common = dict(
        family=family,
        gen_length=gen_length,
        steps=_steps(extra, values, gen_length),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k) if top_k and top_k > 0 else 0,
        seed=_integer("seed", seed, *SEED_RANGE),
        **decoding_values,
    )
    if family == LLADA:
        return _resolve_llada(values, common)
    return _resolve_dream(values, common, block_length_sent="block_length" in extra)


def _steps(extra: dict[str, Any], values: dict[str, Any], gen_length: int) -> int:
    """Denoising steps: at most one per generated token.

    More steps than tokens cannot help: a LLaDA block's schedule commits nothing at steps past its
    token count, and a Dream step past it reveals less than one token on average. A request that
    asks for more is refused; a checkpoint default (Dream ships steps=512) is capped instead.
    """
    if "steps" in extra:
        return _integer("steps", extra["steps"], 1, gen_length)
    default = _integer(
        "steps", values.get("steps", gen_length), 1, note="(the checkpoint's default)"
    )
    return min(default, gen_length)


def _check_blocks(gen_length: int, block_length: int, steps: int) -> None:
    if gen_length % block_length:
        raise ParameterError(
            "block_length",
            f"max_tokens (gen length) {gen_length} is not divisible by block_length {block_length}",
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ParameterError(
            "steps",
            f"steps {steps} is not divisible by the number of blocks {num_blocks} "
            f"(max_tokens {gen_length} / block_length {block_length})",
        )


def _resolve_llada(values: dict[str, Any], common: dict[str, Any]) -> DiffusionParams:
    gen_length, steps = common["gen_length"], common["steps"]
    block_length = _integer("block_length", values.get("block_length", gen_length), 1, gen_length)
    _check_blocks(gen_length, block_length, steps)
    remasking = values.get("remasking", "low_confidence")
    if remasking not in REMASKING:
        raise ParameterError(
            "remasking", f"remasking must be one of {REMASKING}, got {remasking!r}"
        )
    cfg_scale = real("cfg_scale", values.get("cfg_scale", 0.0))
    if cfg_scale < 0:
        raise ParameterError("cfg_scale", f"cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_scale > 0 and common["cache"] != "none":
        raise ParameterError(
            "cfg_scale",
            f"cfg_scale {cfg_scale} needs the whole sequence every step; it is not supported "
            f"with cache {common['cache']!r} (send cache 'none' or cfg_scale 0)",
        )
    if remasking == "random" and (common["threshold"] is not None or common["factor"] is not None):
        raise ParameterError(
            "remasking",
            "remasking 'random' gives random confidences, which a threshold or factor cannot "
            "rank; use remasking 'low_confidence' with threshold/factor",
        )
    if common["top_p"] < 1.0 or common["top_k"] > 0:
        raise ParameterError(
            "top_p" if common["top_p"] < 1.0 else "top_k",
            f"top_p={common['top_p']} / top_k={common['top_k']} are not supported by LLaDA "
            "decoding (its sampler is Gumbel-max over the full distribution)",
        )
    return DiffusionParams(
        block_length=block_length, remasking=remasking, cfg_scale=cfg_scale, **common
    )


def _resolve_dream(
    values: dict[str, Any], common: dict[str, Any], block_length_sent: bool
) -> DiffusionParams:
    alg = values.get("alg", "origin")
    if alg not in DREAM_ALGS:
        raise ParameterError("alg", f"alg must be one of {DREAM_ALGS}, got {alg!r}")
    alg_temp = real("alg_temp", values.get("alg_temp", 0.0) or 0.0)
    if alg_temp < 0 or 0 < alg_temp < MIN_ALG_TEMP:
        raise ParameterError("alg_temp", f"alg_temp must be 0 or >= {MIN_ALG_TEMP}, got {alg_temp}")
    eps = real("eps", values.get("eps", 1e-3))
    if not 0 < eps < 1:
        raise ParameterError("eps", f"eps must be in (0, 1), got {eps}")
    if not 0 < common["top_p"] <= 1:
        raise ParameterError("top_p", f"top_p must be in (0, 1], got {common['top_p']}")
    params = DiffusionParams(
        block_length=_dream_block_length(values, common, block_length_sent),
        alg=alg,
        alg_temp=alg_temp,
        eps=eps,
        **common,
    )
    if params.blockwise_dream and not params.parallel and params.steps_per_block < 2:
        raise ParameterError(
            "steps",
            f"steps {params.steps} gives {params.steps_per_block} step per block of "
            f"{params.block_length}; Dream's blockwise schedule needs at least 2 (the first "
            "step of a block commits only its first token): send more steps, fewer blocks, or "
            "a threshold",
        )
    return params


def _dream_block_length(values: dict[str, Any], common: dict[str, Any], sent: bool) -> int:
    gen_length = common["gen_length"]
    blockwise = common["cache"] != "none" or common["threshold"] or common["factor"]
    if not blockwise:
        if sent:
            raise ParameterError(
                "block_length",
                "block_length applies to Dream only in its blockwise modes (cache 'prefix' or "
                "'dual', or a threshold/factor); its published decoding is one canvas",
            )
        return gen_length
    default = DREAM_BLOCK_LENGTH if gen_length % DREAM_BLOCK_LENGTH == 0 else gen_length
    block_length = _integer("block_length", values.get("block_length", default), 1, gen_length)
    _check_blocks(gen_length, block_length, common["steps"])
    return block_length
