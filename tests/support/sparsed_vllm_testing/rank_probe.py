"""Functions that tests run on every tensor-parallel rank through `LLM.collective_rpc`.

Each takes the rank's worker. They live in the package (not in a test module) so that worker
processes and Ray actors can import them by name.
"""

from __future__ import annotations

from typing import Any


def record_steps(worker) -> None:
    """From now on, log what this rank samples each step and the head count of its patterns."""
    runner = worker.model_runner
    if hasattr(runner, "step_log"):
        return
    runner.step_log = []
    advance = runner._advance

    def recording_advance(requests, counts, logits):
        sampled = advance(requests, counts, logits)
        runner.step_log.append({"sampled": sampled, "pattern_heads": _pattern_heads(runner)})
        return sampled

    # execute_model calls self._advance: an instance attribute takes precedence.
    runner._advance = recording_advance


def take_steps(worker) -> list[dict[str, Any]]:
    """The steps logged since `record_steps` or the last call, oldest first."""
    log = worker.model_runner.step_log
    steps, log[:] = list(log), []
    return steps


def _pattern_heads(runner) -> list[int]:
    """Distinct query-head counts of the patterns stored on this rank."""
    store = runner.patterns
    return sorted(
        {
            pattern.kv_indices.shape[0]
            for slot in store.slots()
            for pattern in store.layers((slot, 0)).values()
        }
    )


def selection_scale(worker) -> float:
    """The scale this rank's runner scores SparseD selection with."""
    return worker.model_runner.selection_scale
