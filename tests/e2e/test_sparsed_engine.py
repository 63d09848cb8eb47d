"""SparseD inside real vLLM engines: staged dense -> select -> sparse, patterns, memory pool."""

import pytest
import torch
from engines import generate_ids
from sparsed_oracle import SparsedOracle, llada_oracle_generate
from vllm import EngineArgs, LLMEngine, SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

from sparsed_vllm.reference.generate import dream_generate, llada_generate

PROMPT_37 = list(range(3, 40))  # 37 + 32 = 69 tokens: partial last tile at block size 16
PROMPT_5 = [11, 12, 13, 14, 15]
SPARSE = {"sparsed": True, "sparsed_block_size": 16, "sparsed_select": 0.3}


def llada_params(extra, gen=32):
    return SamplingParams(
        max_tokens=gen,
        temperature=0,
        ignore_eos=True,
        extra_args={"steps": 32, "block_length": 8, **extra},
    )


def dream_params(extra, gen=32):
    return SamplingParams(
        max_tokens=gen,
        temperature=0,
        ignore_eos=True,
        extra_args={"steps": 16, "alg": "entropy", **extra},
    )


def test_all_tiles_kept_is_exactly_dense(llada_llm, dream_llm):
    keep_all = {**SPARSE, "sparsed_select": 1.0}
    prompts = [PROMPT_37, PROMPT_5]
    for llm, params in ((llada_llm, llada_params), (dream_llm, dream_params)):
        dense = generate_ids(llm, prompts, params({"sparsed": False}))
        assert generate_ids(llm, prompts, params(keep_all)) == dense


@pytest.mark.parametrize("prompt", [PROMPT_37, PROMPT_5], ids=["P37-partial-tile", "P5"])
def test_llada_sparsed_equals_reference_sparsed(llada_llm, llada_tiny, llada_mask, prompt):
    got = generate_ids(llada_llm, [prompt], llada_params(SPARSE))[0]
    expected, oracle = llada_oracle_generate(llada_tiny, llada_mask, prompt)
    assert oracle.stages == ["dense"] * 7 + ["select"] + ["sparse"] * 24
    assert got == expected
    dense = generate_ids(llada_llm, [prompt], llada_params({"sparsed": False}))[0]
    dense_ref = llada_generate(
        llada_tiny,
        torch.tensor([prompt]),
        steps=32,
        gen_length=32,
        block_length=8,
        mask_id=llada_mask,
    )[0, len(prompt) :].tolist()
    assert dense == dense_ref


def test_dream_gqa_sparsed_equals_reference_sparsed(dream_llm, dream_tiny, dream_mask):
    prompt = PROMPT_37
    extra = {**SPARSE, "sparsed_skip": 0.25}
    got = generate_ids(dream_llm, [prompt], dream_params(extra))[0]
    oracle = SparsedOracle(dream_tiny.config.num_hidden_layers, 16, 32, 0.25, 0.3, 16)
    dream_tiny.attn_fn, default = oracle, dream_tiny.attn_fn
    try:
        ref = dream_generate(
            dream_tiny,
            torch.tensor([prompt]),
            max_new_tokens=32,
            steps=16,
            alg="entropy",
            mask_id=dream_mask,
        )
    finally:
        dream_tiny.attn_fn = default
    assert oracle.stages == ["dense"] * 5 + ["select"] + ["sparse"] * 10
    assert got == ref[0, len(prompt) :].tolist()


def test_mixed_stage_batch_equals_requests_alone(llada_llm):
    prompts = [PROMPT_37, PROMPT_5, list(range(50, 73)), PROMPT_37, PROMPT_5]
    params = [
        llada_params(SPARSE),
        llada_params({**SPARSE, "sparsed_skip": 0.6, "steps": 8}),
        llada_params({"sparsed": False}),
        llada_params({**SPARSE, "cfg_scale": 1.0, "sparsed_skip": 0.0}),
        # Selection at step 5, in the second block.
        llada_params({**SPARSE, "steps": 8, "block_length": 4, "sparsed_skip": 0.5}, gen=8),
    ]
    together = generate_ids(llada_llm, prompts, params)
    alone = [generate_ids(llada_llm, [p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert together == alone


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"sparsed": "yes"}, "sparsed must be true or false (or 1/0), got 'yes'"),
        ({"sparsed_skip": 1.0}, r"sparsed_skip must be in [0, 1), got 1.0"),
        ({"sparsed_select": 0}, "sparsed_select must be in (0, 1], got 0.0"),
        ({"sparsed_block_size": 100}, "sparsed_block_size must be one of (16, 32, 64, 128, 256)"),
    ],
)
def test_out_of_range_sparsed_values_are_rejected(llada_llm, extra, message):
    with pytest.raises(VLLMValidationError) as info:
        generate_ids(llada_llm, [PROMPT_5], llada_params(extra))
    assert message in str(info.value)


def test_bad_plugin_settings_fail_at_start(llada_tiny_dir):
    with pytest.raises(Exception, match="sparsed.skip must be in"):
        EngineArgs(
            model=str(llada_tiny_dir), additional_config={"sparsed": {"skip": 2}}
        ).create_engine_config()
    with pytest.raises(Exception, match="unknown sparsed setting"):
        EngineArgs(
            model=str(llada_tiny_dir), additional_config={"sparsed": {"topk": 2}}
        ).create_engine_config()


@pytest.fixture(scope="module")
def small_pool_engine(llada_tiny_dir):
    """In-process engine (one `step()` = one engine step) whose pattern pool fits one request
    (1 MiB/1000: a 69-token request at tiles of 16 needs 640 bytes on this 2-layer model)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = LLMEngine.from_engine_args(
            EngineArgs(
                model=str(llada_tiny_dir),
                dtype="float32",
                enforce_eager=True,
                max_model_len=256,
                additional_config={
                    "sparsed": {"min_seq_len": 0, "block_size": 16, "pattern_pool_mb": 0.001}
                },
            )
        )
        yield engine
        engine.engine_core.shutdown()


def _scheduler(engine):
    return engine.engine_core.engine_core.scheduler


def _worker_slots(worker):
    return worker.model_runner.pattern_slots()


def _run(engine, requests, on_step=None):
    for req_id, prompt, params in requests:
        engine.add_request(req_id, {"prompt_token_ids": prompt}, params)
    tokens = {req_id: [] for req_id, _, _ in requests}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
        if on_step:
            on_step(step)
    return tokens


def test_pool_too_small_queues_requests_and_all_finish(small_pool_engine):
    engine = small_pool_engine
    scheduler = _scheduler(engine)
    delta = dict(output_kind=RequestOutputKind.DELTA)
    params = SamplingParams(
        max_tokens=32,
        temperature=0,
        ignore_eos=True,
        extra_args={"steps": 16, "block_length": 8},
        **delta,
    )
    prompts = {"a": PROMPT_37, "b": list(range(60, 97)), "c": list(range(100, 137))}
    running = []

    def on_step(step):
        running.append(len(scheduler.running))
        assert scheduler.pattern_pool_used <= scheduler.pattern_pool_bytes

    together = _run(engine, [(r, p, params) for r, p in prompts.items()], on_step)
    assert max(running) == 1  # patterns of two requests do not fit: the others waited
    assert scheduler.pattern_pool_used == 0 and not scheduler.budgets
    assert engine.collective_rpc(_worker_slots)[0] == []
    for req_id, prompt in prompts.items():
        alone = _run(engine, [(req_id + "-alone", prompt, params)])
        assert together[req_id] == alone[req_id + "-alone"] and len(together[req_id]) == 32


def test_abort_mid_request_frees_pattern_memory(small_pool_engine):
    engine = small_pool_engine
    scheduler = _scheduler(engine)
    params = SamplingParams(
        max_tokens=32, temperature=0, ignore_eos=True, extra_args={"steps": 32, "block_length": 8}
    )
    engine.add_request("victim", {"prompt_token_ids": PROMPT_37}, params)
    for _ in range(10):  # past the switch step (7): patterns are selected and stored
        engine.step()
    assert scheduler.pattern_pool_used > 0
    assert len(engine.collective_rpc(_worker_slots)[0]) == 1
    assert scheduler.pattern_pool_usage() > 0
    engine.abort_request(["victim"])
    while engine.has_unfinished_requests() or _scheduler(engine).has_requests():
        engine.step()
    engine.step()
    assert scheduler.pattern_pool_used == 0
    assert engine.collective_rpc(_worker_slots)[0] == []


def test_request_larger_than_the_whole_pool_fails_clearly(small_pool_engine):
    params = SamplingParams(max_tokens=32, temperature=0, extra_args={"steps": 32})
    with pytest.raises(VLLMValidationError, match="more than the whole pattern pool") as info:
        _run(small_pool_engine, [("huge", list(range(1, 200)), params)])
    assert info.value.parameter == "sparsed"
    assert not small_pool_engine.has_unfinished_requests()
    assert _scheduler(small_pool_engine).pattern_pool_used == 0
