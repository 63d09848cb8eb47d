"""Offline requests a careless caller may send: refused naming the field, never left behind, never
mixed into another request's logits, and checked with their own engine's settings."""

import pytest
import torch
from engines import generate_ids, make_llm, token_prompts
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from sparsed_vllm.reference.generate import dream_generate

GOOD = SamplingParams(max_tokens=8, temperature=0, extra_args={"steps": 8})


@pytest.mark.parametrize(
    "bad, parameter",
    [
        (SamplingParams(max_tokens=8, temperature=1.0, seed=2**70), "seed"),
        (SamplingParams(max_tokens=8, temperature=0, extra_args={"steps": 10**9}), "steps"),
        (SamplingParams(max_tokens=8, temperature=0, extra_args={"steps": 1e30}), "steps"),
        (
            SamplingParams(max_tokens=8, temperature=0, extra_args={"cfg_scale": float("nan")}),
            "cfg_scale",
        ),
    ],
    ids=["seed-2**70", "steps-1e9", "steps-1e30", "cfg-nan"],
)
def test_a_bad_field_fails_its_call_and_the_llm_stays_usable(llada_llm, bad, parameter):
    prompts = token_prompts([[5, 6, 7], [8, 9, 10], [11, 12]])
    with pytest.raises(VLLMValidationError) as info:
        llada_llm.generate(prompts, [GOOD, bad, GOOD], use_tqdm=False)
    assert info.value.parameter == parameter
    assert parameter in str(info.value)
    # Nothing of the failed call is left in the engine: the next call runs and returns.
    assert llada_llm.llm_engine.get_num_unfinished_requests() == 0
    assert len(generate_ids(llada_llm, [[5, 6, 7], [1, 2]], GOOD)) == 2


def test_offline_request_without_max_tokens_gets_the_default_canvas(llada_llm):
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    params.extra_args = {"steps": 16, "block_length": 64}
    assert len(generate_ids(llada_llm, [[5, 6, 7]], params)[0]) == 128


def test_dream_mask_first_prompt_reads_its_own_logits(dream_llm, dream_tiny, dream_mask):
    """Dream predicts position i from row i - 1; position 0 uses row 0, never a neighbour's row.

    Like the reference, the engine also denoises [MASK] tokens inside the prompt (position 0
    here); only the canvas is returned.
    """
    prompt = [dream_mask, 40, 41, dream_mask, 42]
    others = [[5, 6, 7, 8, 9, 10], list(range(60, 90))]
    params = SamplingParams(max_tokens=8, temperature=0, extra_args={"alg": "entropy", "steps": 8})
    alone = generate_ids(dream_llm, [prompt], params)[0]
    first = generate_ids(dream_llm, [prompt, *others], params)[0]
    last = generate_ids(dream_llm, [*others, prompt], params)[-1]
    assert alone == first == last
    ref = dream_generate(
        dream_tiny,
        torch.tensor([prompt]),
        max_new_tokens=8,
        steps=8,
        alg="entropy",
        mask_id=dream_mask,
    )[0]
    stop = dream_llm.get_tokenizer().eos_token_id
    expected = ref[len(prompt) :].tolist()
    if stop in expected:
        expected = expected[: expected.index(stop) + 1]
    assert alone == expected


def test_each_engine_validates_with_its_own_settings(llada_llm, llada_tiny_dir):
    """A second engine in the process with a tiny pattern pool must not change what the first
    one admits (validator settings used to be class attributes shared by every engine)."""
    forced = SamplingParams(
        max_tokens=64, temperature=0, extra_args={"steps": 64, "block_length": 64, "sparsed": True}
    )
    prompt = [list(range(1, 150))]
    small_pool = make_llm(
        llada_tiny_dir, additional_config={"sparsed": {"pattern_pool_mb": 0.0001}}
    )
    try:
        with pytest.raises(VLLMValidationError) as info:
            small_pool.generate(token_prompts(prompt), forced, use_tqdm=False)
        assert info.value.parameter == "sparsed"
        assert "more than the whole pattern pool" in str(info.value)
        assert len(generate_ids(llada_llm, prompt, forced)[0]) > 0
    finally:
        small_pool.llm_engine.engine_core.shutdown()
