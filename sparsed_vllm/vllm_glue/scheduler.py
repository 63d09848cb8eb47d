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

from sparsed_vllm.core.params import DiffusionParams, family_of, resolve_params
from sparsed_vllm.core.sparsed import (
    DENSE,
    SparsedConfig,
    SparsedSettings,
    pattern_bytes,
    resolve_sparsed,
)
from sparsed_vllm.vllm_glue.config_hook import generation_defaults

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


def request_params(
    request: Request, family: str, defaults: dict[str, Any], seed: int
) -> DiffusionParams:
    """Resolve a vLLM request's SamplingParams + extra_args into diffusion parameters."""
    sp = request.sampling_params
    return resolve_params(
        family,
        sp.extra_args,
        max_tokens=request.max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        seed=sp.seed if sp.seed is not None else seed,
        defaults=defaults,
    )


class DiffusionScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model_config = self.vllm_config.model_config
        self.family = family_of(model_config.architecture)
        self.defaults = generation_defaults(model_config)
        self.diffusion_params: dict[str, DiffusionParams] = {}
        self.diffusion_step: dict[str, int] = {}
        self.sparsed: dict[str, SparsedState] = {}
        self.sparsed_config = SparsedConfig.from_additional_config(
            self.vllm_config.additional_config
        )
        parallel = self.vllm_config.parallel_config
        self._num_layers = model_config.get_num_layers(parallel)
        self._local_heads = model_config.get_num_attention_heads(parallel)
        self.pattern_pool_bytes = self.sparsed_config.pattern_pool_bytes
        self.pattern_pool_used = 0
        self._free_slots = list(range(self.max_num_running_reqs - 1, -1, -1))
        self._rejected: dict[str, str] = {}
        self._seeds = random.Random()

    def request_cost(self, params: DiffusionParams, prompt_len: int) -> int:
        """Tokens a request runs through the model every step."""
        return (prompt_len + params.gen_length) * params.num_sequences

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        try:
            params = request_params(
                request, self.family, self.defaults, self._seeds.getrandbits(63)
            )
            self._check_fits(request, params)
            sparsed = self._sparsed_state(request, params)
        except ValueError as exc:
            # Normally caught in the front end already; an engine-side failure must not crash it.
            logger.error("Rejecting request %s: %s", request.request_id, exc)
            self._rejected[request.request_id] = str(exc)
            return
        self.diffusion_params[request.request_id] = params
        self.sparsed[request.request_id] = sparsed

    def _sparsed_state(self, request: Request, params: DiffusionParams) -> SparsedState:
        seq_len = request.num_prompt_tokens + params.gen_length
        settings = resolve_sparsed(self.sparsed_config, request.sampling_params.extra_args, seq_len)
        if not settings.goes_sparse(params.steps):
            return SparsedState(settings, 0)
        cost = pattern_bytes(
            seq_len,
            params.gen_length,
            settings,
            num_layers=self._num_layers,
            num_heads=self._local_heads,
            num_sequences=params.num_sequences,
        )
        if cost > self.pattern_pool_bytes:
            raise ValueError(
                f"SparseD patterns of this request need {cost / 2**20:.1f} MiB, more than the "
                f"whole pattern pool ({self.sparsed_config.pattern_pool_mb} MiB); raise "
                "sparsed.pattern_pool_mb or send sparsed=false"
            )
        return SparsedState(settings, cost)

    def _check_fits(self, request: Request, params: DiffusionParams) -> None:
        length = request.num_prompt_tokens + params.gen_length
        if length > self.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({params.gen_length}) = {length} exceeds the model length {self.max_model_len}"
            )
        cost = self.request_cost(params, request.num_prompt_tokens)
        if cost > self.max_num_scheduled_tokens:
            raise ValueError(
                f"one step of this request runs {cost} tokens, more than "
                f"max_num_batched_tokens={self.max_num_scheduled_tokens}"
            )

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
        return self.request_cost(
            self.diffusion_params[request.request_id], request.num_prompt_tokens
        )

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
