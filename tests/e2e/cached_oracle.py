"""Expected tokens of a request in any decoding mode, from the plain PyTorch oracle loops."""

import torch

from sparsed_vllm.reference.cached import (
    dream_generate_block,
    llada_generate_fast,
    llada_generate_with_dual_cache,
    llada_generate_with_prefix_cache,
)
from sparsed_vllm.reference.generate import dream_generate, llada_generate

LLADA_CACHED = {
    "none": llada_generate_fast,
    "prefix": llada_generate_with_prefix_cache,
    "dual": llada_generate_with_dual_cache,
}


def llada_tokens(model, mask_id: int, prompt: list[int], gen: int, extra: dict) -> list[int]:
    """The canvas tail of LLaDA decoding with extra_args `extra` (steps, block_length, cache,
    threshold, factor), greedy."""
    extra = dict(extra)
    cache = extra.pop("cache", "none")
    steps, block = extra.pop("steps"), extra.pop("block_length")
    args = dict(steps=steps, gen_length=gen, block_length=block, mask_id=mask_id)
    if cache == "none" and not extra:
        x = llada_generate(model, torch.tensor([prompt]), **args)
    else:
        x = LLADA_CACHED[cache](model, torch.tensor([prompt]), **args, **extra).x
    return x[0, len(prompt) :].tolist()


def dream_tokens(model, mask_id: int, prompt: list[int], gen: int, extra: dict) -> list[int]:
    """The canvas tail of Dream decoding with extra_args `extra`, greedy: the published single
    canvas, or the blockwise loop when a cache, threshold or factor is set."""
    extra = dict(extra)
    steps = extra.pop("steps")
    if not {"cache", "threshold", "factor"} & set(extra):
        x = dream_generate(
            model, torch.tensor([prompt]), max_new_tokens=gen, steps=steps, mask_id=mask_id, **extra
        )
    else:
        result = dream_generate_block(
            model, torch.tensor([prompt]), max_new_tokens=gen, steps=steps, mask_id=mask_id, **extra
        )
        x = result.x
    return x[0, len(prompt) :].tolist()


def cut_at(tokens: list[int], stop_id: int) -> list[int]:
    """What vLLM returns for a finished canvas: up to and including the first stop token."""
    return tokens[: tokens.index(stop_id) + 1] if stop_id in tokens else tokens
