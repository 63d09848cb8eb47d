"""Dream-v0 (7B, Qwen2.5 layout) for vLLM: bidirectional attention, GQA, q/k/v biases.

Loads the real checkpoint's tensor names (`model.layers.N.self_attn.q_proj`, `lm_head`, ...).
The logits shift of Dream (position i predicted from hidden state i - 1) is applied by the
decoding loop, which asks for the hidden rows it needs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from sparsed_vllm.model_executor.models.common import DiffusionLM
from vllm.config import VllmConfig


class DreamModel(DiffusionLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        super().__init__(
            config, tied=bool(getattr(config, "tie_word_embeddings", False)), qkv_bias=True
        )
        self.config = config

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return self.load_shared_weights(weights)
