"""Model runner for diffusion decoding: one call of `execute_model` is one denoising step.

Why it exists: vLLM's runners are built around an input batch, block tables and last-token
sampling. Here every scheduled request contributes its whole sequence (prompt + canvas, plus a
prompt-masked copy under classifier-free guidance) to one flattened varlen batch; logits are
computed only at positions whose token can still be committed; each request's own
`DiffusionRequest` applies the commit rule and returns a finished block's tokens (or nothing).
Every tensor-parallel rank runs this identically (same metadata, same seeded generators) so the
canvases never diverge.
vLLM internals used (0.32): SchedulerOutput/NewRequestData fields, `set_forward_context`,
`get_model`, `ModelRunnerOutput`, and the runner methods the Worker calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.model_loader import get_model
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from sparsed_vllm.core.params import LLADA, DiffusionParams, family_of
from sparsed_vllm.core.pattern import default_scale, llada_reference_scale
from sparsed_vllm.core.request import DiffusionRequest
from sparsed_vllm.core.sparsed import SELECT, PatternStore, SparsedConfig, SparsedSettings
from sparsed_vllm.vllm_glue.attention import DiffusionAttentionMetadata, SequenceSparsity

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so it shares its handlers


@dataclass
class DiffusionRunnerOutput(ModelRunnerOutput):
    # req_id -> mean fraction of kept tiles over layers, heads and query tiles, reported on the
    # request's selection step (the scheduler logs it with the request's stage counts).
    kept_fraction: dict[str, float] = field(default_factory=dict)


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


class DiffusionModelRunner:
    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.device = device
        self.dtype = self.model_config.dtype
        self.mask_id = mask_token_id(self.model_config.hf_config)
        self.requests: dict[str, DiffusionRequest] = {}
        # req_id -> (SparseD settings, pattern slot) for requests that go sparse.
        self.sparsed: dict[str, tuple[SparsedSettings, int]] = {}
        self.patterns = PatternStore()
        hf_config = self.model_config.hf_config
        self.selection_scale = selection_scale(
            SparsedConfig.from_additional_config(vllm_config.additional_config),
            hf_config,
            self.model_config.get_head_size(),
        )
        self.kv_caches: list[torch.Tensor] = []
        self.model: torch.nn.Module | None = None
        self.model_memory_usage = 0
        self.is_pooling_model = False
        self.lora_config = None

    # Model lifecycle, called by the Worker.
    def load_model(self, load_dummy_weights: bool = False, **kwargs) -> None:
        start = time.perf_counter()
        if load_dummy_weights:
            self.vllm_config.load_config.load_format = "dummy"
        self.model = get_model(vllm_config=self.vllm_config)
        logger.info("Loaded diffusion model in %.2f s", time.perf_counter() - start)

    def get_model(self) -> torch.nn.Module:
        return self.model

    def get_kv_cache_spec(self) -> dict:
        # No layer keeps a KV cache: the engine then profiles and allocates nothing.
        return {}

    def initialize_kv_cache(self, kv_cache_config, kv_cache_allocation_context=None) -> None:
        return None

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def update_max_model_len(self, max_model_len: int) -> None:
        self.model_config.max_model_len = max_model_len

    @torch.inference_mode()
    def warming_up_model(self) -> None:
        """One forward over a max-length sequence, so the first request pays no warm-up."""
        length = min(self.model_config.max_model_len, 256)
        ids = torch.full((length,), self.mask_id, dtype=torch.long, device=self.device)
        self._forward([ids])

    # Housekeeping the Worker may call; nothing to do without caches, LoRA or drafts.
    def reset_mm_cache(self) -> None:
        return None

    def reset_encoder_cache(self) -> None:
        return None

    def take_draft_token_ids(self):
        return None

    def shutdown(self) -> None:
        self.requests.clear()
        self.sparsed.clear()

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
        self.requests.pop(req_id, None)
        sparsed = self.sparsed.pop(req_id, None)
        if sparsed is not None:
            self.patterns.drop(sparsed[1])

    def _sync_requests(self, scheduler_output) -> None:
        # Ids of requests this worker never saw (aborted while waiting) are ignored.
        for req_id in scheduler_output.finished_req_ids:
            self._drop(req_id)
        steps = scheduler_output.diffusion_steps
        for new in scheduler_output.scheduled_new_reqs:
            step = steps[new.req_id]
            params = DiffusionParams(**step.params)
            self.requests[new.req_id] = DiffusionRequest(new.prompt_token_ids, params, self.mask_id)
            if step.slot is not None:
                self.sparsed[new.req_id] = (SparsedSettings(**step.sparsed), step.slot)
        for req_id in scheduler_output.num_scheduled_tokens:
            expected, actual = steps[req_id].step, self.requests[req_id].step
            if expected != actual:
                raise RuntimeError(
                    f"request {req_id}: scheduler is at step {expected}, worker at {actual}"
                )

    def _forward(
        self, sequences: list[torch.Tensor], sparsity: list[SequenceSparsity] | None = None
    ) -> torch.Tensor:
        """Hidden states of sequences laid end to end. -> [sum(L), hidden]"""
        input_ids = torch.cat(sequences).to(self.device)
        positions = torch.cat([torch.arange(s.numel()) for s in sequences]).to(self.device)
        metadata = DiffusionAttentionMetadata.build(
            [s.numel() for s in sequences],
            self.device,
            sparsity,
            self.patterns,
            self.selection_scale,
        )
        with set_forward_context(
            metadata, self.vllm_config, num_tokens=input_ids.numel(), slot_mapping={}
        ):
            return self.model(input_ids=input_ids, positions=positions)

    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None) -> ModelRunnerOutput:
        self._sync_requests(scheduler_output)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        if not req_ids:
            return EMPTY_MODEL_RUNNER_OUTPUT
        requests = [self.requests[r] for r in req_ids]
        steps = scheduler_output.diffusion_steps
        sequences, rows, counts, sparsity = [], [], [], []
        offset = 0
        for req_id, request in zip(req_ids, requests, strict=True):
            positions = request.logit_positions()
            counts.append(positions.numel())
            stage = steps[req_id].stage
            # A step with nothing left to commit (more steps than masked tokens in the block)
            # needs no forward, unless it is the step that selects the SparseD patterns.
            if positions.numel() == 0 and stage != SELECT:
                continue
            for index, seq in enumerate(request.sequences()):
                sequences.append(seq)
                rows.append(positions + offset)
                offset += seq.numel()
                sparsity.append(self._sequence_sparsity(req_id, index, stage))
        logits = self._logits(sequences, rows, sparsity)
        sampled = self._advance(requests, counts, logits)
        kept = {r: self._kept_fraction(r) for r in req_ids if steps[r].stage == SELECT}
        for req_id, request in zip(req_ids, requests, strict=True):
            if request.finished:
                self._drop(req_id)
        return DiffusionRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            kept_fraction=kept,
        )

    def _logits(self, sequences, rows, sparsity) -> torch.Tensor:
        """fp32 logits at the candidate rows of all sequences. -> [sum(rows), V]"""
        vocab = self.model_config.get_vocab_size()
        if not sequences:
            return torch.empty(0, vocab, device=self.device)
        hidden = self._forward(sequences, sparsity)
        row_index = torch.cat(rows).to(self.device)
        if row_index.numel() == 0:
            # The logits all-gather under TP must never see an empty tensor.
            return torch.empty(0, vocab, device=self.device)
        return self.model.compute_logits(hidden[row_index]).float()

    def _sequence_sparsity(self, req_id: str, index: int, stage: str) -> SequenceSparsity:
        request = self.requests[req_id]
        settings, slot = self.sparsed.get(req_id, (None, -1))
        if settings is None:
            return SequenceSparsity(stage, (slot, index), request.params.gen_length, 0, 0.0)
        return SequenceSparsity(
            stage, (slot, index), request.params.gen_length, settings.block_size, settings.select
        )

    def _kept_fraction(self, req_id: str) -> float:
        slot = self.sparsed[req_id][1]
        fractions = [
            _pattern_kept_fraction(p)
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
            # n may be 0: a block whose tokens are all committed before its last step.
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


def _pattern_kept_fraction(pattern) -> float:
    """Kept fraction of a TilePattern (CPU path) or a one-sequence PackedTilePattern (GPU)."""
    if hasattr(pattern, "unpack"):
        pattern = pattern.unpack()[0]
    return pattern.kept_fraction()
