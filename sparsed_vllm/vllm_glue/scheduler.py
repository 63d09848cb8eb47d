"""Scheduler for diffusion decoding: one engine step is one denoising step of every running request.

Why it exists: vLLM's scheduler plans autoregressive token growth against a KV cache. Diffusion LMs
recompute prompt + canvas every step with no cache, so this subclass owns `schedule()`: every
running request costs its full sequence (twice under classifier-free guidance) against the token
budget each step, new requests join at any step while they fit, and each request's step index and
resolved parameters travel to every worker in `DiffusionSchedulerOutput.diffusion_steps`.
The base class's `update_from_output` is reused: it appends the tokens a step returns (a committed
block, or nothing), applies EOS/stop/max_tokens checks and frees finished requests.
vLLM internals used here (0.32): Scheduler fields `running`, `waiting`, `requests`,
`finished_req_ids`, `_pause_state`; `NewRequestData.from_request`; `CachedRequestData`.
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

from sparsed_vllm.core.params import DiffusionParams
from sparsed_vllm.core.sparsed import DENSE, SparsedSettings
from sparsed_vllm.vllm_glue.admission import admit_request, engine_limits

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares its handlers


@dataclass
class DiffusionStep:
    """What every worker must agree on for one request in one step (kept small: sent each step)."""

    step: int
    stage: str = DENSE  # SparseD stage of this step: dense | select | sparse
    slot: int | None = None  # pattern slot, for requests that go sparse
    # Only on the request's first step: the resolved diffusion parameters and SparseD settings.
    params: dict[str, Any] | None = None
    sparsed: dict[str, Any] | None = None


@dataclass
class SparsedState:
    """Scheduler-side SparseD bookkeeping of one request."""

    settings: SparsedSettings
    pattern_bytes: int
    slot: int | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"dense": 0, "select": 0, "sparse": 0})
    kept_fraction: float | None = None


@dataclass
class DiffusionSchedulerOutput(SchedulerOutput):
    diffusion_steps: dict[str, DiffusionStep] = field(default_factory=dict)


class DiffusionScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = engine_limits(self.vllm_config)
        self.diffusion_params: dict[str, DiffusionParams] = {}
        self.diffusion_step: dict[str, int] = {}
        self.sparsed: dict[str, SparsedState] = {}
        self.step_tokens: dict[str, int] = {}
        self.pattern_pool_bytes = self.limits.sparsed.pattern_pool_bytes
        self.pattern_pool_used = 0
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
        self.diffusion_params[request.request_id] = admission.params
        self.sparsed[request.request_id] = SparsedState(admission.sparsed, admission.pattern_bytes)
        self.step_tokens[request.request_id] = admission.step_tokens

    def schedule(self, throttle_prefills: bool = False) -> DiffusionSchedulerOutput:
        self.current_step += 1
        budget = self.max_num_scheduled_tokens
        if self._pause_state.name == "PAUSED_ALL":
            budget = 0
        num_scheduled: dict[str, int] = {}
        steps: dict[str, DiffusionStep] = {}
        running: list[Request] = []
        for request in self.running:
            cost = self._cost(request)
            if cost > budget:
                continue
            budget -= cost
            num_scheduled[request.request_id] = cost
            running.append(request)
        new_requests = self._admit_waiting(budget, num_scheduled)
        for request in running + new_requests:
            steps[request.request_id] = self._step_info(request.request_id)
        for request in new_requests:
            info = steps[request.request_id]
            info.params = self.diffusion_params[request.request_id].to_dict()
            info.sparsed = self.sparsed[request.request_id].settings.to_dict()
        output = DiffusionSchedulerOutput(
            scheduled_new_reqs=[NewRequestData.from_request(r, ()) for r in new_requests],
            scheduled_cached_reqs=self._cached_data(running),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=[],
            diffusion_steps=steps,
        )
        self._after_schedule(output)
        return output

    def _step_info(self, req_id: str) -> DiffusionStep:
        step = self.diffusion_step[req_id]
        sparsed = self.sparsed[req_id]
        stage = sparsed.settings.stage(step, self.diffusion_params[req_id].steps)
        sparsed.counts[stage] += 1
        return DiffusionStep(step, stage=stage, slot=sparsed.slot)

    def _cost(self, request: Request) -> int:
        return self.step_tokens[request.request_id]

    def _admit_waiting(self, budget: int, num_scheduled: dict[str, int]) -> list[Request]:
        admitted: list[Request] = []
        now = time.monotonic()
        while self.waiting and len(self.running) < self.max_num_running_reqs:
            request = self.waiting.peek_request()
            if request.request_id in self._rejected:
                break
            cost = self._cost(request)
            sparsed = self.sparsed[request.request_id]
            pool_free = self.pattern_pool_bytes - self.pattern_pool_used
            if cost > budget or sparsed.pattern_bytes > pool_free:
                break
            self.waiting.pop_request()
            if sparsed.pattern_bytes:
                self.pattern_pool_used += sparsed.pattern_bytes
                sparsed.slot = self._free_slots.pop()
            budget -= cost
            num_scheduled[request.request_id] = cost
            request.status = RequestStatus.RUNNING
            if request.prefill_stats is not None:
                # Counted once, on the request's first output (vllm:prompt_tokens_total).
                request.prefill_stats.set(
                    num_prompt_tokens=request.num_prompt_tokens,
                    num_local_cached_tokens=0,
                    num_external_cached_tokens=0,
                )
            self.running.append(request)
            self.diffusion_step[request.request_id] = 0
            if self.log_stats:
                request.record_event(EngineCoreEventType.SCHEDULED, now)
            admitted.append(request)
        return admitted

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
            # The whole sequence is recomputed every step: everything known is "computed".
            request.num_computed_tokens = request.num_tokens
            request.num_in_flight_tokens += num_tokens
            self.diffusion_step[req_id] += 1
        self.finished_req_ids = set()

    def update_from_output(
        self, scheduler_output, model_runner_output
    ) -> dict[int, EngineCoreOutputs]:
        rejected = self._finish_rejected()
        for req_id, fraction in getattr(model_runner_output, "kept_fraction", {}).items():
            if req_id in self.sparsed:
                self.sparsed[req_id].kept_fraction = fraction
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

    def _finish_rejected(self) -> list[Request]:
        if not self._rejected:
            return []
        ids, self._rejected = list(self._rejected), {}
        return self.finish_requests(ids, RequestStatus.FINISHED_ERROR)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        req_id = request.request_id
        self.diffusion_params.pop(req_id, None)
        self.diffusion_step.pop(req_id, None)
        self.step_tokens.pop(req_id, None)
        sparsed = self.sparsed.pop(req_id, None)
        if sparsed is not None:
            self._release_patterns(req_id, sparsed)
        return super()._free_request(request, delay_free_blocks)

    def _release_patterns(self, req_id: str, sparsed: SparsedState) -> None:
        if sparsed.slot is not None:
            self.pattern_pool_used -= sparsed.pattern_bytes
            self._free_slots.append(sparsed.slot)
        if sparsed.counts["select"]:
            logger.info(
                "SparseD %s: %d dense, %d select, %d sparse steps; kept %.1f%% of tiles",
                req_id,
                sparsed.counts["dense"],
                sparsed.counts["select"],
                sparsed.counts["sparse"],
                100 * (sparsed.kept_fraction or 0.0),
            )

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            stats.kv_cache_usage = self.get_kv_cache_usage()
        return stats

    def get_kv_cache_usage(self) -> float:
        """Pattern-pool usage: it takes the KV cache's place (vLLM logs and exports it)."""
        if not self.pattern_pool_bytes:
            return 0.0
        return self.pattern_pool_used / self.pattern_pool_bytes
