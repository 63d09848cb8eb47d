"""Per-request diffusion-decoding parameters: defaults, validation, resolution.

No vLLM import: the same resolution runs in the API front end (to reject bad requests with a
clear message), in the scheduler (to plan steps) and in tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

LLADA = "llada"
DREAM = "dream"
FAMILIES = (LLADA, DREAM)
REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")

# extra_args keys per family; everything else in extra_args is rejected with its name.
_COMMON_KEYS = ("steps",)
_LLADA_KEYS = ("block_length", "remasking", "cfg_scale")
_DREAM_KEYS = ("alg", "alg_temp", "eps")
DIFFUSION_KEYS = _COMMON_KEYS + _LLADA_KEYS + _DREAM_KEYS
SPARSED_KEYS = ("sparsed", "sparsed_skip", "sparsed_select", "sparsed_block_size")


@dataclass(frozen=True)
class DiffusionParams:
    """Everything one request's denoising loop needs, fully resolved.

    `gen_length` is the canvas length (the request's max_tokens). Dream decodes one canvas, which
    is modelled as a single block (`block_length == gen_length`).
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def family_of(architecture: str) -> str:
    """Map a checkpoint architecture name to its decoding family."""
    if architecture.startswith("LLaDA"):
        return LLADA
    if architecture.startswith("Dream"):
        return DREAM
    raise ValueError(f"architecture {architecture!r} is neither LLaDA nor Dream")


def diffusion_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The diffusion keys of a checkpoint's generation config (Dream ships steps/alg/...)."""
    return {k: generation_config[k] for k in DIFFUSION_KEYS if generation_config.get(k) is not None}


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_keys(family: str, extra: dict[str, Any]) -> None:
    allowed = set(_COMMON_KEYS) | set(SPARSED_KEYS)
    allowed |= set(_LLADA_KEYS if family == LLADA else _DREAM_KEYS)
    for key in extra:
        if key in allowed:
            continue
        if key in DIFFUSION_KEYS:
            raise ValueError(f"extra_args {key!r} does not apply to {family} models")
        raise ValueError(f"unknown extra_args key {key!r}; supported: {', '.join(sorted(allowed))}")


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
) -> DiffusionParams:
    """Merge request values over checkpoint defaults and validate; ValueError names the value."""
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

    gen_length = _number("max_tokens", max_tokens, int)
    if gen_length < 1:
        raise ValueError(f"max_tokens (the generation length) must be >= 1, got {gen_length}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    common = dict(
        family=family,
        gen_length=gen_length,
        steps=_number("steps", values.get("steps", gen_length), int),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k) if top_k and top_k > 0 else 0,
        seed=int(seed),
    )
    if common["steps"] < 1:
        raise ValueError(f"steps must be >= 1, got {common['steps']}")
    if family == LLADA:
        return _resolve_llada(values, common)
    return _resolve_dream(values, common)


def _resolve_llada(values: dict[str, Any], common: dict[str, Any]) -> DiffusionParams:
    gen_length, steps = common["gen_length"], common["steps"]
    block_length = _number("block_length", values.get("block_length", gen_length), int)
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    if gen_length % block_length:
        raise ValueError(
            f"max_tokens (gen length) {gen_length} is not divisible by block_length {block_length}"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps {steps} is not divisible by the number of blocks {num_blocks} "
            f"(max_tokens {gen_length} / block_length {block_length})"
        )
    remasking = values.get("remasking", "low_confidence")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    cfg_scale = _number("cfg_scale", values.get("cfg_scale", 0.0), float)
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if common["top_p"] < 1.0 or common["top_k"] > 0:
        raise ValueError(
            f"top_p={common['top_p']} / top_k={common['top_k']} are not supported by LLaDA "
            "decoding (its sampler is Gumbel-max over the full distribution)"
        )
    return DiffusionParams(
        block_length=block_length, remasking=remasking, cfg_scale=cfg_scale, **common
    )


def _resolve_dream(values: dict[str, Any], common: dict[str, Any]) -> DiffusionParams:
    alg = values.get("alg", "origin")
    if alg not in DREAM_ALGS:
        raise ValueError(f"alg must be one of {DREAM_ALGS}, got {alg!r}")
    alg_temp = _number("alg_temp", values.get("alg_temp", 0.0) or 0.0, float)
    if alg_temp < 0:
        raise ValueError(f"alg_temp must be >= 0, got {alg_temp}")
    eps = _number("eps", values.get("eps", 1e-3), float)
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if not 0 < common["top_p"] <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {common['top_p']}")
    return DiffusionParams(
        block_length=common["gen_length"], alg=alg, alg_temp=alg_temp, eps=eps, **common
    )
