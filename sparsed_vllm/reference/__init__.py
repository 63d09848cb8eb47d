"""Plain PyTorch LLaDA / Dream models and samplers: the numerical oracle for the vLLM path."""

from sparsed_vllm.reference.generate import dream_generate, llada_generate
from sparsed_vllm.reference.models import (
    DreamModel,
    LLaDAModel,
    load_reference_model,
    sdpa_attention,
)

__all__ = [
    "DreamModel",
    "LLaDAModel",
    "dream_generate",
    "llada_generate",
    "load_reference_model",
    "sdpa_attention",
]
