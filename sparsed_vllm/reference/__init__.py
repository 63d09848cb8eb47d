"""Plain PyTorch LLaDA / Dream models and samplers: the numerical oracle for the vLLM path."""

from sparsed_vllm.reference.cached import (
    DecodeResult,
    dream_generate_block,
    llada_generate_fast,
    llada_generate_with_dual_cache,
    llada_generate_with_prefix_cache,
)
from sparsed_vllm.reference.generate import dream_generate, llada_generate
from sparsed_vllm.reference.models import (
    DreamModel,
    LLaDAModel,
    load_reference_model,
    sdpa_attention,
)

__all__ = [
    "DecodeResult",
    "DreamModel",
    "LLaDAModel",
    "dream_generate",
    "dream_generate_block",
    "llada_generate",
    "llada_generate_fast",
    "llada_generate_with_dual_cache",
    "llada_generate_with_prefix_cache",
    "load_reference_model",
    "sdpa_attention",
]
