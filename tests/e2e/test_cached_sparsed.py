"""SparseD on cached and parallel decoding (CPU engines, fp32, the exact attention path).

Patterns are selected at the first full forward at or after step int(steps * skip) + 1; later
refreshes are block-sparse and each cached window row attends to the kept key tiles of its query
tile. Engine tokens must equal a step-by-step reference loop doing exactly that.
"""

import pytest
from engines import generate_ids
from sparsed_oracle import llada_cached_sparsed
from vllm import SamplingParams

PROMPT = list(range(3, 40))  # 37 + 32 tokens: 5 tiles of 16, the last one partial
SPARSE = {"sparsed": True, "sparsed_block_size": 16, "sparsed_select": 0.3, "sparsed_skip": 0.2}
BASE = {"steps": 32, "block_length": 8}
MODES = {
    "prefix": {**BASE, "cache": "prefix"},
    "dual": {**BASE, "cache": "dual"},
    "dual-threshold": {**BASE, "cache": "dual", "threshold": 0.5},
    "prefix-factor": {**BASE, "cache": "prefix", "factor": 1.0},
    "none-threshold": {**BASE, "cache": "none", "threshold": 0.5},
}


def params(extra):
    return SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, extra_args=extra)


@pytest.mark.parametrize("mode", MODES)
def test_engine_equals_the_cached_sparsed_oracle(llada_llm, llada_tiny, llada_mask, mode):
    extra = {**MODES[mode], **SPARSE}
    got = generate_ids(llada_llm, [PROMPT], params(extra))[0]
    expected, stages = llada_cached_sparsed(llada_tiny, llada_mask, PROMPT, 32, extra)
    assert "select" in stages and stages[-1] == "sparse"
    assert got == expected


def test_selection_waits_for_a_refresh(llada_tiny, llada_mask):
    """Switch step 7 falls inside the first block of 8: with a cache the selection is the second
    block's refresh (step 8); without one it is step 7 itself, as in the paper."""
    dual = {**MODES["dual"], **SPARSE}
    _, stages = llada_cached_sparsed(llada_tiny, llada_mask, PROMPT, 32, dual)
    assert stages.index("select") == 8 and stages.count("dense") == 8
    exact = {**BASE, "cache": "none", **SPARSE}
    _, stages = llada_cached_sparsed(llada_tiny, llada_mask, PROMPT, 32, exact)
    assert stages.index("select") == 7


@pytest.mark.parametrize("mode", ["prefix", "dual-threshold"])
def test_keeping_every_tile_is_the_cached_mode_without_sparsed(llada_llm, mode):
    keep_all = {**MODES[mode], **SPARSE, "sparsed_select": 1.0}
    without = {**MODES[mode], "sparsed": False}
    prompts = [PROMPT, list(range(50, 120))]
    assert generate_ids(llada_llm, prompts, params(keep_all)) == generate_ids(
        llada_llm, prompts, params(without)
    )


def test_batch_mixing_exact_cached_dense_and_sparse_equals_each_alone(llada_llm):
    extras = [
        {**BASE, "sparsed": False},
        {**BASE, **SPARSE},
        {**MODES["dual"], "sparsed": False},
        {**MODES["dual"], **SPARSE},
        {**MODES["prefix-factor"], **SPARSE},
        {**MODES["none-threshold"], **SPARSE},
    ]
    prompts = [PROMPT, list(range(60, 90)), PROMPT, list(range(5, 50)), PROMPT, PROMPT]
    together = generate_ids(llada_llm, prompts, [params(e) for e in extras])
    alone = [
        generate_ids(llada_llm, [p], params(e))[0] for p, e in zip(prompts, extras, strict=True)
    ]
    assert together == alone
