"""`sparsed:` Prometheus metrics on the OpenAI server's /metrics.

Why it exists: the statistics live in the engine-core process (the scheduler), /metrics is served
by the API-server process, and vLLM 0.32 has no channel for a plugin's own statistics between
them: `SchedulerStats` is decoded field by field into vLLM's class, so extra fields are dropped,
and stat-logger plugins only see vLLM's fields. So the scheduler writes a snapshot of
`core.metrics.DecodingStats` to a file whose path the API server chose (the environment variable
below, inherited by the engine core it spawns), and a collector registered in the API server's
Prometheus registry reads the latest snapshot at each scrape. One engine per server (data
parallelism is not supported here). Remove when vLLM carries plugin statistics to its loggers.
vLLM internals used (0.32): `vllm.v1.metrics.prometheus.get_prometheus_registry` is the registry
/metrics serves.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from sparsed_vllm.core.metrics import DecodingStats

PATH_ENV = "SPARSED_VLLM_METRICS_PATH"
# The snapshot is rewritten at most this often (and whenever a request finishes).
WRITE_INTERVAL_S = 0.25

_installed = False


def install_exporter() -> None:
    """In the API-server process: choose the snapshot path and register the collector."""
    global _installed
    if _installed:
        return
    from prometheus_client import REGISTRY

    if PATH_ENV not in os.environ:
        folder = tempfile.mkdtemp(prefix="sparsed-vllm-metrics-")
        os.environ[PATH_ENV] = str(Path(folder) / "stats.json")
    REGISTRY.register(SparsedCollector(Path(os.environ[PATH_ENV])))
    _installed = True


class SnapshotWriter:
    """In the engine core: writes the stats snapshot where the API server reads it (if any)."""

    def __init__(self) -> None:
        path = os.environ.get(PATH_ENV)
        self.path = Path(path) if path else None
        self._last = 0.0

    def write(self, stats: DecodingStats, force: bool = False) -> None:
        """Write `stats` if a server reads them and the last write is old enough (or `force`);
        the snapshot is built only then, not on every engine step."""
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._last < WRITE_INTERVAL_S:
            return
        self._last = now
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(stats.snapshot()))
        os.replace(partial, self.path)  # readers see a whole snapshot or the previous one


class SparsedCollector:
    """Prometheus collector of the latest snapshot (nothing before the engine wrote one)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        try:
            stats = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        yield GaugeMetricFamily(
            "sparsed:pattern_pool_used_bytes",
            "SparseD pattern memory reserved by running requests, per worker",
            value=stats["pattern_pool_used_bytes"],
        )
        yield GaugeMetricFamily(
            "sparsed:pattern_pool_total_bytes",
            "SparseD pattern pool size per worker (sparsed.pattern_pool_mb)",
            value=stats["pattern_pool_total_bytes"],
        )
        stages = GaugeMetricFamily(
            "sparsed:requests_by_stage",
            "Requests of the last engine step by SparseD stage",
            labels=["stage"],
        )
        for stage, count in stats["requests_by_stage"].items():
            stages.add_metric([stage], count)
        yield stages
        yield CounterMetricFamily(
            "sparsed:selection_steps",
            "SparseD selection steps run (one per request that went sparse)",
            value=stats["selection_steps"],
        )
        yield CounterMetricFamily(
            "sparsed:cache_refreshes",
            "Full forwards that refreshed a request's KV cache (cached decoding)",
            value=stats["cache_refreshes"],
        )
        yield _histogram(
            HistogramMetricFamily,
            "sparsed:kept_tile_fraction",
            "Fraction of key tiles kept by a request's SparseD patterns",
            stats["kept_tile_fraction"],
        )
        yield _histogram(
            HistogramMetricFamily,
            "sparsed:denoising_steps_per_request",
            "Denoising steps a finished request took",
            stats["steps_per_request"],
        )
        yield _histogram(
            HistogramMetricFamily,
            "sparsed:tokens_committed_per_step",
            "Tokens a request committed in one denoising step",
            stats["tokens_per_step"],
        )

    def describe(self):
        # Unchecked collector: names are known only once a snapshot exists.
        return []


def _histogram(family, name: str, documentation: str, data: dict):
    cumulative, buckets = 0, []
    for bound, count in zip([*data["buckets"], float("inf")], data["counts"], strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
    return family(name, documentation, buckets=buckets, sum_value=data["sum"])
