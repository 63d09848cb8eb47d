"""Scheduler for diffusion decoding: one engine step is one denoising step of every running request.

Why it exists: vLLM's scheduler plans autoregressive token growth. Here a step of a request runs
its whole sequence (exact decoding, a cache refresh) or a window of it (a cached step), so this
subclass owns `schedule()`. It keeps only budgets: the tokens each request's next step runs
(admission gives the first, the runner reports each next one), the KV-cache pages of cached
requests (vLLM's KV cache manager: a request that does not fit waits, and its pages are freed
when it finishes or is aborted) and the SparseD pattern pool. Everything that changes per step
(step counters, stages, the canvas) is owned by the decode state on the workers
(`core.request.DiffusionRequest`); a request's resolved parameters reach every worker once, with
its first step, in `DiffusionSchedulerOutput.diffusion_starts`.
The base class's `update_from_output` is reused: it appends the tokens a step returns (a committed
block, or nothing), applies EOS/stop/max_tokens checks and frees finished requests.
vLLM internals used here (0.32): Scheduler fields `running`, `waiting`, `requests`,
`finished_req_ids`, `_pause_state`, `kv_cache_manager` (`allocate_slots`, `get_block_ids`,
`new_step_starts`, `take_new_block_ids`); `Request.prefill_stats`; `NewRequestData.from_request`;
`CachedRequestData`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from sparsed_vllm.core.admission import Admission
from sparsed_vllm.core.metrics import DecodingStats
from sparsed_vllm.core.sparsed import SELECT
from sparsed_vllm.vllm_glue.admission import admit_request, engine_limits
from sparsed_vllm.vllm_glue.metrics import SnapshotWriter

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares its handlers


@dataclass
class DiffusionStart:
    """What every worker needs to start a request (sent once, with its first step)."""

    params: dict[str, Any]  # resolved DiffusionParams
    sparsed: dict[str, Any] | None  # SparsedSettings, for a request that goes sparse
    slot: int | None  # its pattern slot


@dataclass
class DiffusionSchedulerOutput(SchedulerOutput):
    diffusion_starts: dict[str, DiffusionStart] = field(default_factory=dict)


@dataclass
class RequestBudget:
    """What the scheduler holds for one request: costs and resources, nothing per step."""

    admission: Admission
    step_tokens: int  # tokens its next step runs
    slot: int | None = None  # pattern slot once admitted, for requests that go sparse


class DiffusionScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = engine_limits(self.vllm_config)
        self.budgets: dict[str, RequestBudget] = {}
        self.pattern_pool_bytes = self.limits.sparsed.pattern_pool_bytes
        self.pattern_pool_used = 0
        self.stats = DecodingStats(self.pattern_pool_bytes)
        self._snapshots = SnapshotWriter()
        self._snapshots.write(self.stats, force=True)
        self._free_slots = list(range(self.max_num_running_reqs - 1, -1, -1))
        self._rejected: dict[str, str] = {}
        self._seeds = random.Random()

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        try:
            admission = admit_request(
                self.limits,
                request.sampling_params,
                request.num_prompt_tokens,
                seed=self._seeds.getrandbits(63),
            )
        except ValueError as exc:
            # The front end admits every request with the same checks; a failure here must still
            # finish only this request, never the engine.
            logger.error("Rejecting request %s: %s", request.request_id, exc)
            self._rejected[request.request_id] = str(exc)
            return
        self.budgets[request.request_id] = RequestBudget(admission, admission.step_tokens)

    def schedule(self, throttle_prefills: bool = False) -> DiffusionSchedulerOutput:
        self.current_step += 1
        self.kv_cache_manager.new_step_starts()
        budget = self.max_num_scheduled_tokens
        if self._pause_state.name == "PAUSED_ALL":
            budget = 0
        num_scheduled: dict[str, int] = {}
        running: list[Request] = []
        for request in self.running:
            cost = self.budgets[request.request_id].step_tokens
            if cost > budget:
                continue
            budget -= cost
            num_scheduled[request.request_id] = cost
            running.append(request)
        new_requests = self._admit_waiting(budget, num_scheduled)
        output = DiffusionSchedulerOutput(
            scheduled_new_reqs=[
                NewRequestData.from_request(r, self._block_ids(r)) for r in new_requests
            ],
            scheduled_cached_reqs=self._cached_data(running),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=[],
            diffusion_starts={r.request_id: self._start(r.request_id) for r in new_requests},
        )
        self._after_schedule(output)
        return output

    def _start(self, req_id: str) -> DiffusionStart:
        budget = self.budgets[req_id]
        admission = budget.admission
        sparsed = admission.sparsed.to_dict() if budget.slot is not None else None
        return DiffusionStart(admission.params.to_dict(), sparsed, budget.slot)

    def _block_ids(self, request: Request) -> tuple[list[int], ...]:
        if not self.budgets[request.request_id].admission.kv_tokens:
            return ()
        return self.kv_cache_manager.get_block_ids(request.request_id)

    def _admit_waiting(self, tokens_left: int, num_scheduled: dict[str, int]) -> list[Request]:
        """Start waiting requests in arrival order while their first step, KV pages and
        patterns fit; the first that does not fit waits (and with it those behind it)."""
        admitted: list[Request] = []
        now = time.monotonic()
        while self.waiting and len(self.running) < self.max_num_running_reqs:
            request = self.waiting.peek_request()
            if request.request_id in self._rejected:
                break
            held = self.budgets[request.request_id]
            admission = held.admission
            pool_free = self.pattern_pool_bytes - self.pattern_pool_used
            if held.step_tokens > tokens_left or admission.pattern_bytes > pool_free:
                break
            if admission.kv_tokens and not self._allocate_kv(request, admission.kv_tokens):
                break
            self.waiting.pop_request()
            if admission.pattern_bytes:
                self.pattern_pool_used += admission.pattern_bytes
                held.slot = self._free_slots.pop()
            tokens_left -= held.step_tokens
            num_scheduled[request.request_id] = held.step_tokens
            self._start_running(request, now)
            admitted.append(request)
        return admitted

    def _allocate_kv(self, request: Request, num_tokens: int) -> bool:
        """Reserve KV pages for the whole sequence; False (and nothing held) if they do not fit."""
        blocks = self.kv_cache_manager.allocate_slots(
            request, num_tokens, has_scheduled_reqs=bool(self.running)
        )
        return blocks is not None

    def _start_running(self, request: Request, now: float) -> None:
        request.status = RequestStatus.RUNNING
        if request.prefill_stats is not None:
            # Counted once, on the request's first output (vllm:prompt_tokens_total).
            request.prefill_stats.set(
                num_prompt_tokens=request.num_prompt_tokens,
                num_local_cached_tokens=0,
                num_external_cached_tokens=0,
            )
        self.running.append(request)
        if self.log_stats:
            request.record_event(EngineCoreEventType.SCHEDULED, now)

    @staticmethod
    def _cached_data(requests: list[Request]) -> CachedRequestData:
        return CachedRequestData(
            req_ids=[r.request_id for r in requests],
            resumed_req_ids=set(),
            new_token_ids=[],
            all_token_ids={},
            new_block_ids=[None] * len(requests),
            num_computed_tokens=[r.num_computed_tokens for r in requests],
            num_output_tokens=[r.num_output_tokens for r in requests],
        )

    def _after_schedule(self, output: DiffusionSchedulerOutput) -> None:
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            # Everything known is "computed": the canvas is rewritten in place, not appended.
            request.num_computed_tokens = request.num_tokens
            request.num_in_flight_tokens += num_tokens
        self.finished_req_ids = set()
        # Drained every step so vLLM's list of new KV blocks does not grow (nothing zeroes them).
        self.kv_cache_manager.take_new_block_ids()

    def update_from_output(
        self, scheduler_output, model_runner_output
    ) -> dict[int, EngineCoreOutputs]:
        rejected = self._finish_rejected()
        for req_id, tokens in getattr(model_runner_output, "next_step_tokens", {}).items():
            if req_id in self.budgets:
                self.budgets[req_id].step_tokens = tokens
        self._record_stats(model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request in rejected:
            client = outputs.setdefault(request.client_index, EngineCoreOutputs())
            client.outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )
        return outputs

    def _record_stats(self, output) -> None:
        stats = self.stats
        finished = getattr(output, "finished", {})
        stages = {r: s for r, s in getattr(output, "stages", {}).items() if r not in finished}
        stats.record_step(stages, getattr(output, "committed", {}), getattr(output, "refreshes", 0))
        for req_id, fraction in getattr(output, "kept_fraction", {}).items():
            stats.kept_tile_fraction.observe(fraction)
            logger.info("SparseD %s: selected, %.1f%% of tiles kept", req_id, 100 * fraction)
        for req_id, summary in finished.items():
            stats.steps_per_request.observe(summary["steps"])
            if summary["stages"][SELECT] or summary["threshold"] or summary["factor"]:
                logger.info("Request %s: %s", req_id, summary)
        stats.pattern_pool_used_bytes = self.pattern_pool_used
        self._snapshots.write(stats, force=bool(finished))

    def _finish_rejected(self) -> list[Request]:
        if not self._rejected:
            return []
        ids, self._rejected = list(self._rejected), {}
        return self.finish_requests(ids, RequestStatus.FINISHED_ERROR)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        budget = self.budgets.pop(request.request_id, None)
        if budget is not None and budget.slot is not None:
            self.pattern_pool_used -= budget.admission.pattern_bytes
            self._free_slots.append(budget.slot)
        # The base class returns the request's KV pages to vLLM's pool.
        return super()._free_request(request, delay_free_blocks)

    def pattern_pool_usage(self) -> float:
        """Fraction of the SparseD pattern pool reserved by running requests."""
        if not self.pattern_pool_bytes:
            return 0.0
        return self.pattern_pool_used / self.pattern_pool_bytes
