"""SparseD schedule and settings: dense -> select -> sparse, per request (no vLLM import).

Plugin-wide defaults come from `--additional-config '{"sparsed": {...}}'` (`SparsedConfig`);
a request may override them through extra_args (`sparsed`, `sparsed_skip`, `sparsed_select`,
`sparsed_block_size`). The schedule follows the paper: with T denoising steps in total (all
blocks together), steps before `switch = int(T * skip) + 1` are dense, step `switch` is dense and
selects one block pattern per (sequence, layer, head), and every later step is block-sparse. With
a KV cache the selection waits for the first full forward from `switch` on; the decode state
(`core/request.py`, `DiffusionRequest.stage`) applies the rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from sparsed_vllm.core.capabilities import ALL_TILE_SIZES, EXACT_BACKEND, Backend
from sparsed_vllm.core.errors import ParameterError
from sparsed_vllm.core.params import real
from sparsed_vllm.core.pattern import generation_start_tile, num_kept_tiles, num_tiles

DENSE = "dense"
SELECT = "select"
SPARSE = "sparse"
SCALES = ("head_dim", "reference")
_INDEX_BYTES = 4  # int32 tile indices


def _check_fraction(name: str, value: Any, low_open: bool, high_open: bool) -> float:
    value = real(name, value)
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ParameterError(name, f"{name} must be in {interval}, got {value}")
    return value


@dataclass(frozen=True)
class SparsedConfig:
    """Plugin-wide SparseD settings (`--additional-config '{"sparsed": {...}}'`)."""

    enabled: bool = True
    skip: float = 0.2
    select: float = 0.3
    block_size: int = 128
    # Below this many tokens per sequence dense attention is used (sparse does not pay there);
    # a request's `sparsed: true` overrides it.
    min_seq_len: int = 8192
    # Memory for selected patterns per worker, like the KV cache of an autoregressive model;
    # requests whose patterns do not fit wait.
    pattern_pool_mb: float = 1024.0
    # "head_dim": 1/sqrt(head_dim). "reference": the published code's choice (LLaDA scored with
    # 1/sqrt(num_heads)), to reproduce its masks exactly.
    scale: str = "head_dim"

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"sparsed.enabled must be true or false, got {self.enabled!r}")
        _check_fraction("sparsed.skip", self.skip, low_open=False, high_open=True)
        _check_fraction("sparsed.select", self.select, low_open=True, high_open=False)
        # The device is not known here: the engine checks the tile against its backend.
        if isinstance(self.block_size, bool) or self.block_size not in ALL_TILE_SIZES:
            raise ValueError(
                f"sparsed.block_size must be one of {ALL_TILE_SIZES}, got {self.block_size!r}"
            )
        if (
            isinstance(self.min_seq_len, bool)
            or not isinstance(self.min_seq_len, int)
            or (self.min_seq_len < 0)
        ):
            raise ValueError(
                f"sparsed.min_seq_len must be an integer >= 0, got {self.min_seq_len!r}"
            )
        if (
            isinstance(self.pattern_pool_mb, bool)
            or not isinstance(self.pattern_pool_mb, (int, float))
            or self.pattern_pool_mb < 0
        ):
            raise ValueError(f"sparsed.pattern_pool_mb must be >= 0, got {self.pattern_pool_mb!r}")
        if self.scale not in SCALES:
            raise ValueError(f"sparsed.scale must be one of {SCALES}, got {self.scale!r}")

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> SparsedConfig:
        section = (additional_config or {}).get("sparsed", {})
        if not isinstance(section, dict):
            raise ValueError(f"additional_config 'sparsed' must be an object, got {section!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(
                f"unknown sparsed setting(s) {unknown}; supported: {', '.join(sorted(known))}"
            )
        return cls(**section)

    @property
    def pattern_pool_bytes(self) -> int:
        return int(self.pattern_pool_mb * 2**20)


@dataclass(frozen=True)
class SparsedSettings:
    """One request's resolved SparseD settings."""

    enabled: bool
    skip: float
    select: float
    block_size: int

    def switch_step(self, total_steps: int) -> int:
        return int(total_steps * self.skip) + 1

    def goes_sparse(self, total_steps: int) -> bool:
        return self.enabled and self.switch_step(total_steps) < total_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_sparsed(
    config: SparsedConfig,
    extra_args: dict[str, Any] | None,
    seq_len: int | None,
    backend: Backend = EXACT_BACKEND,
) -> SparsedSettings:
    """Apply a request's overrides to the plugin defaults. seq_len None: validate only.

    The tile size must be one that `backend` (the engine's attention backend) runs.
    """
    extra = extra_args or {}
    forced = extra.get("sparsed")
    # The OpenAI server's vllm_xargs carry numbers, not booleans: accept 1/0 as well.
    if forced is not None:
        if forced not in (True, False) or not isinstance(forced, (bool, int)):
            raise ParameterError(
                "sparsed", f"sparsed must be true or false (or 1/0), got {forced!r}"
            )
        forced = bool(forced)
    skip = _check_fraction("sparsed_skip", extra.get("sparsed_skip", config.skip), False, True)
    select = _check_fraction(
        "sparsed_select", extra.get("sparsed_select", config.select), True, False
    )
    block_size = backend.check_tile(
        "sparsed_block_size", extra.get("sparsed_block_size", config.block_size)
    )
    if forced is not None:
        enabled = forced
    else:
        enabled = config.enabled and (seq_len is None or seq_len >= config.min_seq_len)
    return SparsedSettings(enabled=enabled, skip=skip, select=select, block_size=block_size)


def max_kept_tiles(seq_len: int, gen_length: int, settings: SparsedSettings) -> int:
    """Upper bound on kept key tiles per query tile (prompt pass + generation pass)."""
    n = num_tiles(seq_len, settings.block_size)
    g = generation_start_tile(seq_len, gen_length, settings.block_size)
    prompt_keep = min(num_kept_tiles(n, settings.select), g)
    return prompt_keep + num_kept_tiles(n - g, settings.select)


def pattern_bytes(
    seq_len: int,
    gen_length: int,
    settings: SparsedSettings,
    *,
    num_layers: int,
    num_heads: int,
    num_sequences: int = 1,
) -> int:
    """Pattern memory of one request on one worker: indices + counts per (layer, head, q tile)."""
    n = num_tiles(seq_len, settings.block_size)
    per_tile = max_kept_tiles(seq_len, gen_length, settings) + 1
    return num_sequences * num_layers * num_heads * n * per_tile * _INDEX_BYTES


class PatternStore:
    """Selected patterns on one worker: (slot, sequence index) -> layer -> pattern.

    The scheduler hands out slots and accounts their memory; the worker drops a slot when its
    request finishes or is aborted.
    """

    def __init__(self) -> None:
        self._patterns: dict[tuple[int, int], dict[int, Any]] = {}
        # (key, layer) -> (tag, value): something computed from that pattern (`derived`).
        self._derived: dict[tuple[tuple[int, int], int], tuple[Any, Any]] = {}

    def put(self, key: tuple[int, int], layer: int, pattern: Any) -> None:
        self._patterns.setdefault(key, {})[layer] = pattern
        self._derived.pop((key, layer), None)

    def derived(self, key: tuple[int, int], layer: int, tag: Any, build) -> Any:
        """`build(pattern)` of (key, layer)'s pattern, kept until asked with another `tag` (one
        value per pattern: e.g. the kept-tile lists of the window a cached request decodes, which
        every step of a block reuses)."""
        entry = self._derived.get((key, layer))
        if entry is None or entry[0] != tag:
            entry = (tag, build(self.get(key, layer)))
            self._derived[(key, layer)] = entry
        return entry[1]

    def get(self, key: tuple[int, int], layer: int) -> Any:
        try:
            return self._patterns[key][layer]
        except KeyError:
            raise RuntimeError(f"no SparseD pattern for slot {key} layer {layer}") from None

    def layers(self, key: tuple[int, int]) -> dict[int, Any]:
        return self._patterns.get(key, {})

    def drop(self, slot: int) -> None:
        for key in [k for k in self._patterns if k[0] == slot]:
            del self._patterns[key]
        for pair in [p for p in self._derived if p[0][0] == slot]:
            del self._derived[pair]

    def slots(self) -> set[int]:
        return {slot for slot, _ in self._patterns}
