"""Dream-v0 (7B, Qwen2.5 layout) for vLLM: bidirectional attention, GQA, q/k/v biases.

Loads the real checkpoint's tensor names (`model.layers.N.self_attn.q_proj`, `lm_head`, ...).
The logits shift of Dream (position i predicted from hidden state i - 1) is applied by the
decoding loop, which asks for the hidden rows it needs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from sparsed_vllm.model_executor.models.common import DiffusionBackbone, load_renamed_weights
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead


class DreamModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = DiffusionBackbone(config, prefix="model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *args, **kwargs):
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = getattr(self.config, "tie_word_embeddings", False)
        weights = (
            (name, tensor)
            for name, tensor in weights
            if not (tied and name == "lm_head.weight") and "rotary_emb.inv_freq" not in name
        )
        return load_renamed_weights(self, weights)
