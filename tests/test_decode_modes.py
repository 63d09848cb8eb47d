"""The decode state's cached and parallel modes against the Fast-dLLM oracle (no vLLM).

`DiffusionRequest.plan()` says what each step runs; here the plain PyTorch model runs exactly that
(a full forward, a full forward that keeps the K/V, or a window over the kept K/V) and the request
commits. Tokens must equal `sparsed_vllm.reference.cached`'s loops, which run the published block
loops with their own control flow.
"""

import json

import pytest
import torch

from sparsed_vllm.core.params import DREAM, LLADA, resolve_params
from sparsed_vllm.core.request import DiffusionRequest
from sparsed_vllm.reference.cached import (
    dream_generate_block,
    llada_generate_fast,
    llada_generate_with_dual_cache,
    llada_generate_with_prefix_cache,
)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 51))]
GEN = 16
LLADA_ORACLES = {
    "none": llada_generate_fast,
    "prefix": llada_generate_with_prefix_cache,
    "dual": llada_generate_with_dual_cache,
}


def mask_id(ckpt_dir) -> int:
    return json.loads((ckpt_dir / "config.json").read_text())["mask_token_id"]


@torch.no_grad()
def drive(model, request: DiffusionRequest) -> tuple[list[int], list[int]]:
    """Run the request to the end, each step as planned. -> (canvas tail, tokens per step)"""
    kv, plans = None, []
    while not request.finished:
        plan = request.plan()
        assert request.step_tokens == plan.num_tokens  # what the scheduler budgets
        plans.append(plan)
        ids = request.sequences()[0][None]
        if not plan.cached:
            if plan.store_kv:
                hidden, kv = model.forward_with_kv(ids)
            else:
                hidden = model.forward_hidden(ids)
            rows = hidden[0, plan.logit_rows]
        else:
            window = model.forward_window(ids[:, plan.start : plan.end], plan.start, kv)
            rows = window[0, plan.logit_rows - plan.start]
        request.advance(model.compute_logits(rows).float()[None])
    return request.canvas[request.prompt_len :].tolist(), plans


CASES = [
    dict(cache="none", threshold=0.3),
    dict(cache="none", factor=1.0),
    dict(cache="prefix"),
    dict(cache="prefix", threshold=0.3),
    dict(cache="dual"),
    dict(cache="dual", threshold=0.5),
    dict(cache="dual", factor=2.0),
]


def _case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items())


@pytest.mark.parametrize("prompt", PROMPTS, ids=["P7", "P31"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_llada_modes_equal_the_oracle(llada_tiny, llada_tiny_dir, prompt, case):
    mask = mask_id(llada_tiny_dir)
    extra = {"steps": 8, "block_length": 4, **case}
    params = resolve_params(LLADA, extra, max_tokens=GEN)
    canvas, plans = drive(llada_tiny, DiffusionRequest(prompt, params, mask))
    oracle = LLADA_ORACLES[case["cache"]]
    rule = {k: v for k, v in case.items() if k != "cache"}
    ref = oracle(
        llada_tiny,
        torch.tensor([prompt]),
        steps=8,
        gen_length=GEN,
        block_length=4,
        mask_id=mask,
        **rule,
    )
    assert canvas == ref.x[0, len(prompt) :].tolist()
    assert len(plans) == ref.nfe
    # Every cached step runs the window the cache mode says; a block's first step refreshes.
    seq_len = len(prompt) + GEN
    for plan in plans:
        if plan.cached:
            block_start = plan.start
            assert (block_start - len(prompt)) % 4 == 0
            expected_end = seq_len if case["cache"] == "prefix" else block_start + 4
            assert plan.end == expected_end and plan.num_tokens == expected_end - block_start
        else:
            assert (plan.start, plan.end) == (0, seq_len)
        assert plan.store_kv == (case["cache"] != "none")


def test_parallel_modes_commit_several_tokens_per_step(llada_tiny, llada_tiny_dir):
    mask = mask_id(llada_tiny_dir)
    params = resolve_params(
        LLADA, {"block_length": 8, "threshold": 1e-9, "cache": "dual"}, max_tokens=GEN
    )
    request = DiffusionRequest(PROMPTS[1], params, mask)
    drive(llada_tiny, request)
    # A tiny threshold commits a whole block at its refresh step: 2 blocks, 2 steps.
    assert request.commits == [8, 8] and request.step == 2


@pytest.mark.parametrize(
    "case",
    [
        dict(cache="none", threshold=0.2),
        dict(cache="prefix"),
        dict(cache="prefix", threshold=0.2),
        dict(cache="dual"),
        dict(cache="dual", factor=1.0),
    ],
    ids=_case_id,
)
@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "origin"])
def test_dream_blockwise_modes_equal_the_oracle(dream_tiny, dream_tiny_dir, case, alg):
    mask = mask_id(dream_tiny_dir)
    prompt = PROMPTS[1]
    extra = {"steps": 8, "block_length": 4, "alg": alg, **case}
    params = resolve_params(DREAM, extra, max_tokens=GEN)
    assert params.blockwise_dream and params.block_length == 4
    canvas, plans = drive(dream_tiny, DiffusionRequest(prompt, params, mask))
    ref = dream_generate_block(
        dream_tiny,
        torch.tensor([prompt]),
        max_new_tokens=GEN,
        steps=8,
        block_length=4,
        mask_id=mask,
        alg=alg,
        **case,
    )
    assert canvas == ref.x[0, len(prompt) :].tolist()
    assert len(plans) == ref.nfe
