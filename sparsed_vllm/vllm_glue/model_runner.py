"""Model runner for diffusion decoding: one call of `execute_model` is one denoising step.

Why it exists: vLLM's runners are built around an input batch, block tables and last-token
sampling. Here each scheduled request's decode state (`core.request.DiffusionRequest`, owned
here) plans its step: the whole sequence (plus a prompt-masked copy under classifier-free
guidance), or, at a cached step, only a window of it whose queries read the other keys from the
request's pages of the KV cache. The runner lays the planned rows out as one varlen batch (full
sequences first, cached windows after), computes logits only at the rows the plans ask for, lets
each state commit, and reports each request's next step cost to the scheduler. Every
tensor-parallel rank runs this identically (same plans, same seeded generators, all-gathered
logits), so the canvases never diverge.
With `--additional-config '{"runner": {"cuda_graphs": true}}'` (one GPU), a cached step whose
layout (requests, windows, stages) repeats is captured as a CUDA graph at its second occurrence and
replayed for the rest of the block: those steps cost their GPU work instead of ~30 layers' worth of
launches and Python.
The KV cache: cached decoding keeps K/V in vLLM's KV cache. `get_kv_cache_spec` declares one
full-attention page of `cache_config.block_size` tokens per layer, vLLM sizes it from the memory
left after `profile_run` (under `gpu_memory_utilization`) and the scheduler allocates pages per
request through vLLM's KV cache manager; `initialize_kv_cache` allocates one
`[2, pages, page_size, Hkv, D]` tensor per layer (the layout the attention backend reads) and
binds it to the layer.
vLLM internals used (0.32): SchedulerOutput/NewRequestData fields, `set_forward_context`,
`get_model`, `ModelRunnerOutput`, `FullAttentionSpec`, `KVCacheConfig.num_blocks`, the
`Attention.kv_cache` attribute, and the runner methods the workers call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.model_loader import get_model
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from sparsed_vllm.core.params import (
    LLADA,
    VENDOR_KERNELS,
    DiffusionParams,
    RunnerConfig,
    family_of,
)
from sparsed_vllm.core.pattern import default_scale, llada_reference_scale
from sparsed_vllm.core.request import DiffusionRequest, StepPlan
from sparsed_vllm.core.sparsed import (
    DENSE,
    SELECT,
    SPARSE,
    PatternStore,
    SparsedConfig,
    SparsedSettings,
)
from sparsed_vllm.core.staged import AttentionBatch, CachedWindow, KVWrite, SequenceStage
from sparsed_vllm.vllm_glue.attention import DiffusionAttention

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares its handlers

# Logit rows the memory profile reserves for one step: a LLaDA step needs its requests' block
# rows, Dream's published single canvas all its masked positions.
PROFILE_LOGIT_ROWS = 8192


@dataclass
class DiffusionRunnerOutput(ModelRunnerOutput):
    """What the scheduler learns from a step besides the tokens (budgets and statistics)."""

    # req_id -> tokens its next step runs (the scheduler's budget); absent once it finished.
    next_step_tokens: dict[str, int] = field(default_factory=dict)
    # req_id -> SparseD stage of this step, and tokens it committed.
    stages: dict[str, str] = field(default_factory=dict)
    committed: dict[str, int] = field(default_factory=dict)
    # Requests whose step refreshed their KV cache (cached decoding).
    refreshes: int = 0
    # req_id -> mean fraction of kept tiles over layers, heads and query tiles, reported on the
    # request's selection step.
    kept_fraction: dict[str, float] = field(default_factory=dict)
    # req_id -> `DiffusionRequest.summary()` of a request that finished this step.
    finished: dict[str, dict] = field(default_factory=dict)


def selection_scale(config: SparsedConfig, hf_config, head_dim: int) -> float:
    """Scale of the selection scores: 1/sqrt(head_dim), or the published code's choice."""
    family = family_of(hf_config.architectures[0])
    if config.scale == "reference" and family == LLADA:
        return llada_reference_scale(hf_config.num_attention_heads)
    return default_scale(head_dim)


def mask_token_id(hf_config) -> int:
    mask_id = getattr(hf_config, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("the checkpoint's config.json has no mask_token_id")
    return int(mask_id)


@dataclass
class _Row:
    """One sequence of the step's batch."""

    req_id: str
    index: int  # sequence within the request (1: the CFG copy)
    tokens: torch.Tensor  # [start:end] of the sequence
    plan: StepPlan


class DiffusionModelRunner:
    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.device = device
        self.dtype = self.model_config.dtype
        self.mask_id = mask_token_id(self.model_config.hf_config)
        # The one owner of each request's step state; pattern slots and KV pages are the
        # scheduler's resources, kept here by id.
        self.requests: dict[str, DiffusionRequest] = {}
        self.slots: dict[str, int] = {}
        self.kv_pages: dict[str, torch.Tensor] = {}
        self.patterns = PatternStore()
        hf_config = self.model_config.hf_config
        self.selection_scale = selection_scale(
            SparsedConfig.from_additional_config(vllm_config.additional_config),
            hf_config,
            self.model_config.get_head_size(),
        )
        self.kv_caches: list[torch.Tensor] = []
        # Cached steps whose layout repeats run as a captured graph (single GPU, opt-in).
        runner = RunnerConfig.from_additional_config(vllm_config.additional_config)
        self.step_graphs = runner.cuda_graphs and vllm_config.parallel_config.world_size == 1
        self.sparse_kernel = _choose_kernel("sparse_kernel", runner.sparse_kernel, self.device)
        self.cached_kernel = _choose_kernel("cached_kernel", runner.cached_kernel, self.device)
        self._graph: _StepGraph | None = None
        self._first: tuple[tuple, AttentionBatch] | None = None  # a layout seen once
        self.graph_replays = 0
        self.model: torch.nn.Module | None = None
        self.model_memory_usage = 0
        self.is_pooling_model = False
        self.lora_config = None

    # Model lifecycle, called by the Worker.
    def load_model(self, load_dummy_weights: bool = False, **kwargs) -> None:
        start = time.perf_counter()
        if load_dummy_weights:
            self.vllm_config.load_config.load_format = "dummy"
        before = self._allocated()
        self.model = get_model(vllm_config=self.vllm_config)
        # vLLM's memory profile counts weights separately from the profile run's peak.
        self.model_memory_usage = self._allocated() - before
        logger.info("Loaded diffusion model in %.2f s", time.perf_counter() - start)

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def get_model(self) -> torch.nn.Module:
        return self.model

    def _attention_layers(self) -> dict[str, DiffusionAttention]:
        return {m.layer_name: m for m in self.model.modules() if isinstance(m, DiffusionAttention)}

    def get_kv_cache_spec(self) -> dict:
        """One full-attention KV page per layer (used only by cached decoding's requests)."""
        page = self.vllm_config.cache_config.block_size
        return {
            name: FullAttentionSpec(
                block_size=page,
                num_kv_heads=layer.num_kv_heads,
                head_size=layer.head_size,
                dtype=self.dtype,
                non_causal=True,
            )
            for name, layer in self._attention_layers().items()
        }

    def initialize_kv_cache(self, kv_cache_config, kv_cache_allocation_context=None) -> None:
        """One `[2, pages, page_size, Hkv, D]` tensor per layer, bound to the layer; the pages
        are as many as vLLM sized the cache for (its per-layer byte budget)."""
        page = self.vllm_config.cache_config.block_size
        pages = kv_cache_config.num_blocks
        self.kv_caches = []
        for layer in sorted(self._attention_layers().values(), key=lambda m: m.layer_index):
            shape = (2, pages, page, layer.num_kv_heads, layer.head_size)
            layer.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append(layer.kv_cache)

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def update_max_model_len(self, max_model_len: int) -> None:
        self.model_config.max_model_len = max_model_len

    @torch.inference_mode()
    def profile_run(self, randomize_inputs: bool = False) -> None:
        """The largest step's activations, logits and the pattern pool, so that vLLM leaves them
        room when it sizes the KV cache."""
        scheduler = self.vllm_config.scheduler_config
        tokens = scheduler.max_num_scheduled_tokens or scheduler.max_num_batched_tokens
        longest = self.model_config.max_model_len
        lengths = [longest] * (tokens // longest) + ([tokens % longest] if tokens % longest else [])
        sequences = [torch.full((n,), self.mask_id, dtype=torch.long) for n in lengths]
        pool = SparsedConfig.from_additional_config(self.vllm_config.additional_config)
        reserved = torch.empty(pool.pattern_pool_bytes, dtype=torch.uint8, device=self.device)
        hidden = self._forward(sequences)
        self.model.compute_logits(hidden[: min(longest, PROFILE_LOGIT_ROWS)])
        del reserved, hidden

    @torch.inference_mode()
    def warming_up_model(self) -> None:
        """One forward over a short sequence, so the first request pays no warm-up."""
        length = min(self.model_config.max_model_len, 256)
        self._forward([torch.full((length,), self.mask_id, dtype=torch.long)])

    # Housekeeping the Worker may call; nothing to do without LoRA or drafts.
    def reset_mm_cache(self) -> None:
        return None

    def reset_encoder_cache(self) -> None:
        return None

    def take_draft_token_ids(self):
        return None

    def shutdown(self) -> None:
        self.requests.clear()
        self.slots.clear()
        self.kv_pages.clear()

    def add_lora(self, *args, **kwargs):
        raise ValueError("LoRA is not supported for diffusion LMs")

    def remove_lora(self, *args, **kwargs) -> bool:
        return False

    def pin_lora(self, *args, **kwargs) -> bool:
        return False

    def list_loras(self) -> set[int]:
        return set()

    def maybe_remove_all_loras(self, *args, **kwargs) -> None:
        return None

    # The step.
    def _drop(self, req_id: str) -> None:
        self._graph = self._first = None
        self.requests.pop(req_id, None)
        self.kv_pages.pop(req_id, None)
        slot = self.slots.pop(req_id, None)
        if slot is not None:
            self.patterns.drop(slot)

    def _sync_requests(self, scheduler_output) -> None:
        # Ids of requests this worker never saw (aborted while waiting) are ignored.
        for req_id in scheduler_output.finished_req_ids:
            self._drop(req_id)
        starts = scheduler_output.diffusion_starts
        for new in scheduler_output.scheduled_new_reqs:
            start = starts[new.req_id]
            sparsed = SparsedSettings(**start.sparsed) if start.sparsed is not None else None
            params = DiffusionParams(**start.params)
            self.requests[new.req_id] = DiffusionRequest(
                new.prompt_token_ids, params, self.mask_id, sparsed
            )
            if start.slot is not None:
                self.slots[new.req_id] = start.slot
            if new.block_ids:
                self.kv_pages[new.req_id] = torch.tensor(new.block_ids[0], dtype=torch.long)

    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None) -> ModelRunnerOutput:
        self._sync_requests(scheduler_output)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        if not req_ids:
            return EMPTY_MODEL_RUNNER_OUTPUT
        requests = [self.requests[r] for r in req_ids]
        plans = [request.plan() for request in requests]
        logits = self._logits(req_ids, requests, plans)
        sampled = self._advance(requests, [p.logit_rows.numel() for p in plans], logits)
        output = DiffusionRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
        )
        for req_id, request, plan in zip(req_ids, requests, plans, strict=True):
            output.stages[req_id] = plan.stage
            output.committed[req_id] = request.commits[-1]
            output.refreshes += plan.store_kv and not plan.cached
            if plan.stage == SELECT:
                output.kept_fraction[req_id] = self._kept_fraction(req_id)
            if request.finished:
                output.finished[req_id] = request.summary()
                self._drop(req_id)
            else:
                output.next_step_tokens[req_id] = request.step_tokens
        return output

    def _logits(self, req_ids, requests, plans) -> torch.Tensor:
        """fp32 logits at the planned rows, request by request, sequence by sequence. [n, V]"""
        vocab = self.model_config.get_vocab_size()
        rows = [
            _Row(req_id, index, seq[plan.start : plan.end], plan)
            for req_id, request, plan in zip(req_ids, requests, plans, strict=True)
            if plan.runs_forward
            for index, seq in enumerate(request.sequences())
        ]
        if not rows:
            return torch.empty(0, vocab, device=self.device)
        # Full sequences first, cached windows after, each by SparseD stage and tile: every
        # group the attention executor calls at once is one contiguous varlen range.
        batch = sorted(rows, key=self._batch_order)
        offsets, offset = {}, 0
        for row in batch:
            offsets[(row.req_id, row.index)] = offset
            offset += row.tokens.numel()
        row_index = torch.cat(
            [
                row.plan.logit_rows - row.plan.start + offsets[(row.req_id, row.index)]
                for row in rows
            ]
        )
        if row_index.numel() == 0:
            # A selection step with nothing to commit still runs its forward; the logits
            # all-gather under TP must never see an empty tensor.
            self._forward_rows(batch)
            return torch.empty(0, vocab, device=self.device)
        hidden = self._forward_rows(batch)
        return self.model.compute_logits(hidden[row_index.to(self.device)]).float()

    def _batch_order(self, row: _Row) -> tuple:
        settings = self.requests[row.req_id].sparsed
        tile = (settings.block_size, settings.select) if settings is not None else (0, 0.0)
        return (row.plan.cached, (DENSE, SELECT, SPARSE).index(row.plan.stage), tile)

    def _forward_rows(self, batch: list[_Row]) -> torch.Tensor:
        if self.step_graphs and all(r.plan.cached for r in batch):
            return self._graphed(batch)
        self._graph = self._first = None
        return self._run(*self._inputs(batch), self._metadata(batch))

    def _inputs(self, batch: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        positions = [torch.arange(r.plan.start, r.plan.end) for r in batch]
        return torch.cat([r.tokens for r in batch]), torch.cat(positions)

    def _graphed(self, batch: list[_Row]) -> torch.Tensor:
        """A cached step through a graph: its first occurrence of a layout runs eagerly (which
        also builds the per-step kernel plans), the second captures that step's forward with the
        first's metadata, later ones replay it with only the tokens copied in."""
        layout = tuple((r.req_id, r.index, r.plan.start, r.plan.end, r.plan.stage) for r in batch)
        input_ids, positions = self._inputs(batch)
        if self._graph is not None and self._graph.layout == layout:
            self.graph_replays += 1
            return self._graph.run(input_ids)
        self._graph = None  # another layout: the old graph's memory goes back
        if self._first is not None and self._first[0] == layout:
            self._graph = _StepGraph(layout, self._first[1], input_ids, positions, self._run)
            self._first = None
            return self._graph.run(input_ids)
        metadata = self._metadata(batch)
        self._first = (layout, metadata)
        return self._run(input_ids, positions, metadata)

    def _metadata(self, batch: list[_Row]) -> AttentionBatch:
        full = [r for r in batch if not r.plan.cached]
        cached = [r for r in batch if r.plan.cached]
        return AttentionBatch.build(
            [r.tokens.numel() for r in full],
            self.device,
            [self._sequence_stage(r) for r in full],
            self.patterns,
            self.selection_scale,
            cached=[self._cached_window(r) for r in cached],
            kv_write=self._kv_write(batch),
            sparse_kernel=self.sparse_kernel,
            cached_kernel=self.cached_kernel,
        )

    def _forward(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states of whole sequences laid end to end, dense. -> [sum(L), hidden]"""
        metadata = AttentionBatch.build([s.numel() for s in sequences], self.device)
        positions = torch.cat([torch.arange(s.numel()) for s in sequences])
        return self._run(torch.cat(sequences), positions, metadata)

    def _run(self, input_ids, positions, metadata) -> torch.Tensor:
        input_ids, positions = input_ids.to(self.device), positions.to(self.device)
        with set_forward_context(
            metadata, self.vllm_config, num_tokens=input_ids.numel(), slot_mapping={}
        ):
            return self.model(input_ids=input_ids, positions=positions)

    def _cached_window(self, row: _Row) -> CachedWindow:
        return CachedWindow(
            rows=row.tokens.numel(),
            start=row.plan.start,
            kv_len=row.plan.seq_len,
            pages=self.kv_pages[row.req_id],
            stage=self._sequence_stage(row),
        )

    def _kv_write(self, batch: list[_Row]) -> KVWrite | None:
        """Slots of the rows whose K/V the cache keeps: a refresh's sequence, a cached window."""
        page = self.vllm_config.cache_config.block_size
        rows, slots, offset = [], [], 0
        for row in batch:
            n = row.tokens.numel()
            if row.plan.store_kv:
                position = torch.arange(row.plan.start, row.plan.end)
                slots.append(self.kv_pages[row.req_id][position // page] * page + position % page)
                rows.append(torch.arange(offset, offset + n))
            offset += n
        if not slots:
            return None
        row_index = torch.cat(rows)
        everything = row_index.numel() == offset
        return KVWrite(
            rows=None if everything else row_index.to(self.device),
            slots=torch.cat(slots).to(self.device),
        )

    def _sequence_stage(self, row: _Row) -> SequenceStage:
        request = self.requests[row.req_id]
        settings = request.sparsed
        key = (self.slots.get(row.req_id, -1), row.index)
        if settings is None:
            return SequenceStage(row.plan.stage, key, request.params.gen_length)
        return SequenceStage(
            row.plan.stage, key, request.params.gen_length, settings.block_size, settings.select
        )

    def _kept_fraction(self, req_id: str) -> float:
        slot = self.slots[req_id]
        fractions = [
            p.kept_fraction()
            for index in range(self.requests[req_id].params.num_sequences)
            for p in self.patterns.layers((slot, index)).values()
        ]
        return sum(fractions) / len(fractions)

    @staticmethod
    def _advance(
        requests: list[DiffusionRequest], counts: list[int], logits: torch.Tensor
    ) -> list[list[int]]:
        """Split the logits rows per request and apply each request's commit rule."""
        sampled, start = [], 0
        for request, n in zip(requests, counts, strict=True):
            count = request.params.num_sequences * n
            # n may be 0: nothing left to commit at this step.
            per_seq = logits[start : start + count].view(
                request.params.num_sequences, n, logits.shape[-1]
            )
            sampled.append(request.advance(per_seq))
            start += count
        return sampled

    def pattern_slots(self) -> list[int]:
        """Slots that hold patterns on this worker (for tests and debugging)."""
        return sorted(self.patterns.slots())

    def sample_tokens(self, grammar_output) -> ModelRunnerOutput:
        # execute_model already sampled; the engine calls this only if it returned None.
        return EMPTY_MODEL_RUNNER_OUTPUT


class _VendorKernel(NamedTuple):
    """A kernel from our dependencies that `runner.<option>` may choose over ours (its name and
    the GPUs it needs: `core.params.VENDOR_KERNELS`)."""

    steps: str  # the steps it runs, for the start-up log
    available: Callable[[], bool]
    import_error: Callable[[], str | None]
    default: Callable[[torch.device], str]  # the choice of "auto"


def _vendor_kernel(option: str) -> _VendorKernel:
    from sparsed_vllm.kernels.block_sparse import fa4
    from sparsed_vllm.kernels.cached import fa3

    if option == "sparse_kernel":
        return _VendorKernel(
            "SparseD sparse steps",
            *(fa4.fa4_available, fa4.fa4_import_error, fa4.default_sparse_kernel),
        )
    return _VendorKernel(
        "dense cached steps", fa3.fa3_available, fa3.fa3_import_error, fa3.default_cached_kernel
    )


def _choose_kernel(option: str, setting: str, device: torch.device) -> str:
    """The kernel for `runner.<option>` ("sparse_kernel": FA4 or Triton; "cached_kernel": FA3 or
    Triton). The vendor kernel, when named, must import and have its GPU: refused at start-up,
    with the import error, rather than falling back silently. "auto" picks it where it measured
    faster, and says why not elsewhere."""
    name, gpus = VENDOR_KERNELS[option]
    vendor = _vendor_kernel(option)
    if setting == name and device.type == "cuda" and not vendor.available():
        error = vendor.import_error() or f"needs a {gpus} GPU"
        raise ValueError(f"runner.{option} '{name}' cannot run here: {error}")
    if setting != "auto":
        return setting
    chosen = vendor.default(device)
    if device.type == "cuda":
        error = vendor.import_error() or "not measured faster on this GPU"
        last = error.strip().splitlines()[-1]
        why = "" if chosen == name else f" ({name.upper()}: {last})"
        logger.info("%s use the %s kernel%s", vendor.steps, chosen, why)
    return chosen


class _StepGraph:
    """One cached-step layout's forward, captured as a CUDA graph (on other devices the same
    static-buffer path runs eagerly, so CPU tests cover everything but the capture itself).

    The layout fixes every input but the tokens: positions, the KV slots the window writes, the
    pages it reads and the kernels' plans are those of its first step, kept in `metadata`.
    """

    def __init__(self, layout, metadata, input_ids, positions, forward) -> None:
        self.layout, self.metadata, self.forward = layout, metadata, forward
        device = metadata.groups[0].cu_seqlens.device
        self.input_ids = input_ids.to(device)
        self.positions = positions.to(device)
        self.graph = None
        self.hidden: torch.Tensor | None = None
        if device.type == "cuda":
            # The same layout just ran eagerly: kernels are compiled and plans built.
            # Capture needs a stream other than the default one, ordered after this step's work.
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream):
                self.hidden = forward(self.input_ids, self.positions, metadata)
            torch.cuda.current_stream(device).wait_stream(stream)

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        if self.graph is None:
            self.hidden = self.forward(self.input_ids, self.positions, self.metadata)
        else:
            self.graph.replay()
        return self.hidden
