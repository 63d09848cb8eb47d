"""Tensor parallelism on CPU (TP=2, mp executor): the same tokens as TP=1, dense and SparseD.

Each rank holds half the attention heads (Dream tiny: 2 of 4 query heads and 1 of 2 KV heads),
selects and stores the SparseD patterns of those heads, and samples every step itself from the
all-gathered logits; the ranks must agree or their canvases (and the outputs) would drift apart.
One TP=2 engine per model for this module (about 2 GB and 30-60 s to start each).
"""

import math

import pytest
from engines import generate_ids, make_llm
from sparsed_oracle import llada_cached_sparsed, llada_oracle_generate
from sparsed_vllm_testing import rank_probe
from vllm import LLM, SamplingParams

TP = 2
PROMPT_37 = list(range(3, 40))  # 37 + 32 = 69 tokens: a partial last tile at block size 16
PROMPTS = [PROMPT_37, [11, 12, 13, 14, 15], list(range(50, 73))]
SPARSE = {"sparsed": True, "sparsed_block_size": 16}
DENSE = {"sparsed": False}
MODES = {"dense": DENSE, "sparsed": SPARSE}
HEADS = 4  # query heads of both tiny presets (2 per rank)


def tp2_llm(model_dir, **kwargs) -> LLM:
    with pytest.MonkeyPatch.context() as env:
        # One core per rank; read when the engine process starts.
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        llm = make_llm(
            model_dir, tensor_parallel_size=TP, distributed_executor_backend="mp", **kwargs
        )
    llm.collective_rpc(rank_probe.record_steps)
    return llm


@pytest.fixture(scope="module")
def llada_tp2(llada_tiny_dir):
    # The published LLaDA scale, 1/sqrt(total heads): a rank must not use its own head count.
    llm = tp2_llm(llada_tiny_dir, additional_config={"sparsed": {"scale": "reference"}})
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def dream_tp2(dream_tiny_dir):
    llm = tp2_llm(dream_tiny_dir)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def llada_batch(extra):
    """Greedy, seeded sampling at temperature 0.8, and classifier-free guidance in one batch."""
    base = {"steps": 32, "block_length": 8, **extra}
    return [
        SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, extra_args=base),
        SamplingParams(max_tokens=32, temperature=0.8, seed=7, ignore_eos=True, extra_args=base),
        SamplingParams(
            max_tokens=16,
            temperature=0,
            ignore_eos=True,
            extra_args={**base, "steps": 16, "cfg_scale": 1.0},
        ),
    ]


def dream_batch(extra):
    base = {"steps": 16, "alg": "entropy", **extra}
    return [
        SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, extra_args=base),
        SamplingParams(max_tokens=32, temperature=0.8, seed=7, ignore_eos=True, extra_args=base),
        SamplingParams(
            max_tokens=16,
            temperature=0,
            ignore_eos=True,
            extra_args={**base, "alg": "maskgit_plus", "steps": 8},
        ),
    ]


def run_llada_oracle(model, mask, prompt, scale):
    tokens, oracle = llada_oracle_generate(model, mask, prompt, scale)
    assert oracle.stages == ["dense"] * 7 + ["select"] + ["sparse"] * 24
    return tokens


def test_llada_tp2_dense_equals_tp1(llada_tp2, llada_llm):
    expected = generate_ids(llada_llm, PROMPTS, llada_batch(DENSE))
    assert generate_ids(llada_tp2, PROMPTS, llada_batch(DENSE)) == expected
    assert [len(t) for t in expected] == [32, 32, 16]


def test_llada_tp2_sparsed_uses_all_heads_for_the_reference_scale(
    llada_tp2, llada_tiny, llada_mask
):
    total, per_rank = 1 / math.sqrt(HEADS), 1 / math.sqrt(HEADS // TP)
    assert llada_tp2.collective_rpc(rank_probe.selection_scale) == [total] * TP
    expected = run_llada_oracle(llada_tiny, llada_mask, PROMPT_37, total)
    # The prompt is chosen so that a rank scoring with its own head count would differ.
    assert run_llada_oracle(llada_tiny, llada_mask, PROMPT_37, per_rank) != expected
    assert generate_ids(llada_tp2, [PROMPT_37], llada_batch(SPARSE)[:1]) == [expected]


def test_one_token_per_step_under_tp2(llada_tp2, llada_llm):
    # 4 steps per 4-token block: every step of every request commits exactly one token.
    extra = {"steps": 8, "block_length": 4, **DENSE}
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, extra_args=extra)
    expected = generate_ids(llada_llm, PROMPTS, params)
    assert generate_ids(llada_tp2, PROMPTS, params) == expected
    assert [len(t) for t in expected] == [8, 8, 8]


def test_llada_tp2_cached_equals_tp1(llada_tp2, llada_llm):
    """Each rank keeps the K/V of its own heads in its KV cache; pages and plans agree."""
    batch = [
        SamplingParams(
            max_tokens=32,
            temperature=0,
            ignore_eos=True,
            extra_args={"steps": 32, "block_length": 8, "cache": "dual"},
        ),
        SamplingParams(
            max_tokens=32,
            temperature=0.8,
            seed=3,
            ignore_eos=True,
            extra_args={"steps": 16, "block_length": 8, "cache": "prefix", "threshold": 0.5},
        ),
        SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True, extra_args={"steps": 16, **DENSE}
        ),
    ]
    expected = generate_ids(llada_llm, PROMPTS, batch)
    assert generate_ids(llada_tp2, PROMPTS, batch) == expected
    assert [len(t) for t in expected] == [32, 32, 16]


def test_llada_tp2_sparsed_on_the_cache_equals_the_oracle(llada_tp2, llada_tiny, llada_mask):
    """Each rank selects and keeps the patterns of its own heads, refreshes and cached windows
    alike (this engine scores selection with the reference scale, 1/sqrt(all heads))."""
    extra = {
        "steps": 32,
        "block_length": 8,
        "cache": "dual",
        "sparsed_skip": 0.2,
        "sparsed_select": 0.3,
        **SPARSE,
    }
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, extra_args=extra)
    expected, stages = llada_cached_sparsed(
        llada_tiny, llada_mask, PROMPT_37, 32, extra, scale=1 / math.sqrt(HEADS)
    )
    assert "select" in stages
    assert generate_ids(llada_tp2, [PROMPT_37], params) == [expected]


@pytest.mark.parametrize("mode", MODES)
def test_dream_gqa_tp2_equals_tp1(dream_tp2, dream_llm, mode):
    expected = generate_ids(dream_llm, PROMPTS, dream_batch(MODES[mode]))
    assert generate_ids(dream_tp2, PROMPTS, dream_batch(MODES[mode])) == expected
    assert [len(t) for t in expected] == [32, 32, 16]


@pytest.mark.parametrize("model", ["llada", "dream"])
def test_ranks_sample_alike_and_store_their_own_heads(request, model):
    """Unseeded sampling (the scheduler draws the seed), SparseD: both ranks commit the same
    tokens at every step, and each stores patterns for its 2 of the 4 query heads."""
    llm = request.getfixturevalue(f"{model}_tp2")
    batch = llada_batch(SPARSE) if model == "llada" else dream_batch(SPARSE)
    params = [
        SamplingParams(
            max_tokens=p.max_tokens, temperature=1.0, ignore_eos=True, extra_args=p.extra_args
        )
        for p in batch
    ]
    llm.collective_rpc(rank_probe.take_steps)
    generate_ids(llm, PROMPTS, params)
    rank0, rank1 = llm.collective_rpc(rank_probe.take_steps)
    assert rank0 == rank1
    assert any(any(tokens) for step in rank0 for tokens in step["sampled"])
    assert {tuple(step["pattern_heads"]) for step in rank0} == {(), (HEADS // TP,)}
