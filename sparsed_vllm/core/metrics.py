"""Decoding and SparseD statistics of one engine: gauges, counters and histograms (no vLLM).

The scheduler feeds `DecodingStats` from each step's report by the model runner; `snapshot()` is a
JSON-able dict that the server exports under /metrics with the `sparsed:` prefix
(`vllm_glue/metrics.py`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from sparsed_vllm.core.sparsed import DENSE, SELECT, SPARSE

STAGES = (DENSE, SELECT, SPARSE)


@dataclass
class Histogram:
    """Cumulative-bucket histogram in Prometheus's sense (`le` upper bounds, +Inf implied)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last = +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "buckets": list(self.buckets),
            "counts": self.counts,
            "sum": self.total,
            "count": self.count,
        }


@dataclass
class DecodingStats:
    """What the engine reports about diffusion decoding and SparseD."""

    pattern_pool_total_bytes: int
    pattern_pool_used_bytes: int = 0
    # Running requests by the SparseD stage of their last step.
    requests_by_stage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    selection_steps: int = 0
    cache_refreshes: int = 0
    kept_tile_fraction: Histogram = field(
        default_factory=lambda: Histogram((0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0))
    )
    steps_per_request: Histogram = field(
        default_factory=lambda: Histogram(tuple(float(2**i) for i in range(13)))
    )
    tokens_per_step: Histogram = field(
        default_factory=lambda: Histogram((1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0))
    )

    def record_step(self, stages: dict[str, str], committed: dict[str, int], refreshes: int):
        """One engine step: the stage of each request still running after it, and the tokens
        each scheduled request committed."""
        self.requests_by_stage = dict.fromkeys(STAGES, 0)
        for stage in stages.values():
            self.requests_by_stage[stage] += 1
        self.selection_steps += sum(stage == SELECT for stage in stages.values())
        self.cache_refreshes += refreshes
        for tokens in committed.values():
            self.tokens_per_step.observe(tokens)

    def snapshot(self) -> dict[str, Any]:
        return {
            "pattern_pool_total_bytes": self.pattern_pool_total_bytes,
            "pattern_pool_used_bytes": self.pattern_pool_used_bytes,
            "requests_by_stage": dict(self.requests_by_stage),
            "selection_steps": self.selection_steps,
            "cache_refreshes": self.cache_refreshes,
            "kept_tile_fraction": self.kept_tile_fraction.to_dict(),
            "steps_per_request": self.steps_per_request.to_dict(),
            "tokens_per_step": self.tokens_per_step.to_dict(),
        }
