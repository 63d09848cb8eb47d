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

import torch
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.model_loader import get_model
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from sparsed_vllm.core.params import DiffusionParams
from sparsed_vllm.core.request import DiffusionRequest
from sparsed_vllm.vllm_glue.attention import DiffusionAttentionMetadata

logger = init_logger(__name__)


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
    def _sync_requests(self, scheduler_output) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        steps = scheduler_output.diffusion_steps
        for new in scheduler_output.scheduled_new_reqs:
            params = DiffusionParams(**steps[new.req_id].params)
            self.requests[new.req_id] = DiffusionRequest(new.prompt_token_ids, params, self.mask_id)
        for req_id in scheduler_output.num_scheduled_tokens:
            expected, actual = steps[req_id].step, self.requests[req_id].step
            if expected != actual:
                raise RuntimeError(
                    f"request {req_id}: scheduler is at step {expected}, worker at {actual}"
                )

    def _forward(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states of sequences laid end to end. -> [sum(L), hidden]"""
        input_ids = torch.cat(sequences).to(self.device)
        positions = torch.cat([torch.arange(s.numel()) for s in sequences]).to(self.device)
        metadata = DiffusionAttentionMetadata.from_seq_lens(
            [s.numel() for s in sequences], self.device
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
        sequences, rows, counts = [], [], []
        offset = 0
        for request in requests:
            positions = request.logit_positions()
            counts.append(positions.numel())
            for seq in request.sequences():
                sequences.append(seq)
                rows.append(positions + offset)
                offset += seq.numel()
        hidden = self._forward(sequences)
        logits = self.model.compute_logits(hidden[torch.cat(rows).to(self.device)])
        sampled = self._advance(requests, counts, logits.float())
        for req_id, request in zip(req_ids, requests, strict=True):
            if request.finished:
                self.requests.pop(req_id, None)
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
        )

    @staticmethod
    def _advance(
        requests: list[DiffusionRequest], counts: list[int], logits: torch.Tensor
    ) -> list[list[int]]:
        """Split the logits rows per request and apply each request's commit rule."""
        sampled, start = [], 0
        for request, n in zip(requests, counts, strict=True):
            count = request.params.num_sequences * n
            per_seq = logits[start : start + count].view(request.params.num_sequences, n, -1)
            sampled.append(request.advance(per_seq))
            start += count
        return sampled

    def sample_tokens(self, grammar_output) -> ModelRunnerOutput:
        # execute_model already sampled; the engine calls this only if it returned None.
        return EMPTY_MODEL_RUNNER_OUTPUT
