"""Cached (prefix/dual KV cache) and parallel (threshold/factor) decoding in real vLLM engines.

Engine tokens must equal the plain PyTorch oracle (`sparsed_vllm.reference.cached`) token for
token (greedy, fp32), alone and in batches that mix modes and requests joining mid-way; K/V live
in vLLM's KV cache, so a request that does not fit waits and an aborted one frees its pages.
"""

import pytest
from cached_oracle import cut_at, dream_tokens, llada_tokens
from engines import ENGINE_DEFAULTS, generate_ids, token_prompts
from vllm import EngineArgs, LLMEngine, SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 61)), [100, 200, 300]]
GEN = 16
LLADA_MODES = {
    "prefix": dict(cache="prefix"),
    "dual": dict(cache="dual"),
    "prefix-threshold": dict(cache="prefix", threshold=0.3),
    "dual-threshold": dict(cache="dual", threshold=0.5),
    "dual-factor": dict(cache="dual", factor=1.0),
    "none-threshold": dict(cache="none", threshold=0.5),
    "none-factor": dict(cache="none", factor=2.0),
}


def params(extra, gen=GEN, **kwargs):
    return SamplingParams(max_tokens=gen, temperature=0, extra_args=extra, **kwargs)


@pytest.mark.parametrize("mode", LLADA_MODES)
def test_llada_modes_equal_the_oracle(llada_llm, llada_tiny, llada_mask, mode):
    extra = {"steps": 8, "block_length": 4, **LLADA_MODES[mode]}
    got = generate_ids(llada_llm, PROMPTS, params(extra))
    stop = llada_llm.get_tokenizer().eos_token_id
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == cut_at(llada_tokens(llada_tiny, llada_mask, prompt, GEN, extra), stop)


@pytest.mark.parametrize(
    "mode",
    [
        dict(cache="dual", alg="entropy"),
        dict(cache="prefix", alg="maskgit_plus"),
        dict(cache="dual", threshold=0.3),
        dict(cache="none", threshold=0.3, block_length=8),
        dict(cache="prefix", factor=1.0),
    ],
    ids=["dual", "prefix", "dual-threshold", "none-threshold-B8", "prefix-factor"],
)
def test_dream_blockwise_modes_equal_the_oracle(dream_llm, dream_tiny, dream_mask, mode):
    extra = {"steps": 8, "block_length": 4, **mode}
    got = generate_ids(dream_llm, PROMPTS, params(extra))
    stop = dream_llm.get_tokenizer().eos_token_id
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == cut_at(dream_tokens(dream_tiny, dream_mask, prompt, GEN, extra), stop)


@pytest.fixture(scope="module")
def stepped(llada_tiny_dir):
    """An in-process engine: one `step()` is one engine step, and its scheduler is reachable."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = LLMEngine.from_engine_args(
            EngineArgs(model=str(llada_tiny_dir), **{**ENGINE_DEFAULTS, "max_num_seqs": 16})
        )
        yield engine
        engine.engine_core.shutdown()


def _scheduler(engine):
    return engine.engine_core.engine_core.scheduler


def _run(engine, requests, joining=(), join_at=3, on_step=None):
    """Add `requests`, step; add `joining` after `join_at` steps; -> tokens and deltas by id."""
    tokens, deltas = {}, {}

    def add(batch):
        for req_id, prompt, sp in batch:
            engine.add_request(req_id, {"prompt_token_ids": prompt}, sp)
            tokens[req_id], deltas[req_id] = [], []

    add(requests)
    step = 0
    while engine.has_unfinished_requests() or (joining and step <= join_at):
        step += 1
        if step == join_at:
            add(joining)
        for out in engine.step():
            new = list(out.outputs[0].token_ids)
            tokens[out.request_id] += new
            if new:
                deltas[out.request_id].append(len(new))
        if on_step:
            on_step(step)
    return tokens, deltas


DELTA = dict(output_kind=RequestOutputKind.DELTA, ignore_eos=True)


def test_mixed_modes_with_requests_joining_mid_way_equal_each_alone(
    stepped, llada_tiny, llada_mask
):
    modes = {
        "exact": {"steps": 8, "block_length": 4},
        "sparsed": {"steps": 16, "block_length": 8, "sparsed": True, "sparsed_block_size": 16},
        "prefix": {"steps": 8, "block_length": 4, "cache": "prefix"},
        "dual-threshold": {"steps": 8, "block_length": 8, "cache": "dual", "threshold": 0.4},
        "dual": {"steps": 16, "block_length": 4, "cache": "dual"},
        "factor": {"steps": 8, "block_length": 8, "factor": 1.0},
    }
    first = [(name, PROMPTS[i % 3], params(modes[name], **DELTA)) for i, name in enumerate(modes)]
    split = len(first) // 2
    tokens, deltas = _run(stepped, first[:split], joining=first[split:])
    for req_id, prompt, sp in first:
        alone, _ = _run(stepped, [(f"{req_id}-alone", prompt, sp.clone())])
        assert tokens[req_id] == alone[f"{req_id}-alone"], req_id
        if "sparsed" not in modes[req_id]:
            expected = llada_tokens(llada_tiny, llada_mask, prompt, GEN, modes[req_id])
            assert tokens[req_id] == expected, req_id
        # Streaming sends whole blocks, also when a block's step count depends on the logits.
        block = modes[req_id]["block_length"]
        assert all(n % block == 0 for n in deltas[req_id]) and sum(deltas[req_id]) == GEN
    scheduler = _scheduler(stepped)
    assert scheduler.kv_cache_manager.usage == 0 and not scheduler.budgets


def test_kv_is_held_while_running_and_freed_on_abort(stepped):
    scheduler = _scheduler(stepped)
    sp = params({"steps": 32, "block_length": 4, "cache": "dual"}, gen=32, **DELTA)
    stepped.add_request("victim", {"prompt_token_ids": PROMPTS[1]}, sp)
    stepped.add_request("exact", {"prompt_token_ids": PROMPTS[0]}, params({"steps": 16}, **DELTA))
    for _ in range(3):
        stepped.step()
    # 41 + 32 tokens hold one page of 128; the exact request holds none. (vLLM suffixes the
    # ids it is given.)
    ids = {req_id.rsplit("-", 1)[0]: req_id for req_id in scheduler.requests}
    manager = scheduler.kv_cache_manager
    assert len(manager.get_block_ids(ids["victim"])[0]) == 1
    assert manager.get_block_ids(ids["exact"])[0] == []
    assert manager.usage > 0
    stepped.abort_request(["victim"])
    while stepped.has_unfinished_requests():
        stepped.step()
    stepped.step()
    assert manager.usage == 0
    assert stepped.collective_rpc(lambda w: sorted(w.model_runner.kv_pages))[0] == []


def test_requests_whose_kv_does_not_fit_wait(llada_tiny_dir, llada_tiny, llada_mask):
    """A KV cache of two pages (256 tokens) holds one 182-token request at a time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        page_bytes = 2 * 128 * 4 * 16 * 4  # K and V, page of 128, 4 KV heads of 16, fp32
        engine = LLMEngine.from_engine_args(
            EngineArgs(
                model=str(llada_tiny_dir),
                **ENGINE_DEFAULTS,
                kv_cache_memory_bytes=3 * 2 * page_bytes,  # 3 pages per layer, 2 layers
            )
        )
    try:
        scheduler = _scheduler(engine)
        extra = {"steps": 16, "block_length": 8, "cache": "prefix"}
        prompts = {f"r{i}": list(range(1 + i, 151 + i)) for i in range(3)}
        running = []
        tokens, _ = _run(
            engine,
            [(r, p, params(extra, gen=32, **DELTA)) for r, p in prompts.items()],
            on_step=lambda step: running.append(len(scheduler.running)),
        )
        assert max(running) == 1
        for req_id, prompt in prompts.items():
            assert tokens[req_id] == llada_tokens(llada_tiny, llada_mask, prompt, 32, extra)
        assert scheduler.kv_cache_manager.usage == 0
    finally:
        engine.engine_core.shutdown()


@pytest.mark.parametrize(
    "extra, parameter, message",
    [
        ({"cache": "triple"}, "cache", "cache must be one of ('none', 'prefix', 'dual')"),
        ({"threshold": 0}, "threshold", "threshold must be in (0, 1], got 0.0"),
        ({"threshold": 1.5}, "threshold", "threshold must be in (0, 1], got 1.5"),
        ({"factor": -1}, "factor", "factor must be > 0, got -1.0"),
        ({"threshold": 0.9, "factor": 1.0}, "factor", "send only one of them"),
        ({"cache": "dual", "cfg_scale": 1.0}, "cfg_scale", "not supported with cache 'dual'"),
        ({"threshold": 0.9, "remasking": "random"}, "remasking", "remasking 'random'"),
    ],
)
def test_invalid_decoding_options_name_the_field(llada_llm, extra, parameter, message):
    with pytest.raises(VLLMValidationError) as info:
        llada_llm.generate(token_prompts([[1, 2, 3]]), params(extra), use_tqdm=False)
    assert info.value.parameter == parameter
    assert message in str(info.value)


def test_dream_block_length_needs_a_blockwise_mode(dream_llm):
    with pytest.raises(VLLMValidationError) as info:
        dream_llm.generate(token_prompts([[1, 2, 3]]), params({"block_length": 4}), use_tqdm=False)
    assert info.value.parameter == "block_length"
    one_step = {"cache": "dual", "steps": 4, "block_length": 4}  # 1 step per block of 4
    with pytest.raises(VLLMValidationError, match="needs at least 2"):
        dream_llm.generate(token_prompts([[1, 2, 3]]), params(one_step), use_tqdm=False)


def test_plugin_wide_decoding_defaults(llada_tiny_dir, llada_tiny, llada_mask):
    from engines import make_llm

    with pytest.raises(Exception, match="decoding.threshold must be in"):
        EngineArgs(
            model=str(llada_tiny_dir), additional_config={"decoding": {"threshold": 2}}
        ).create_engine_config()
    llm = make_llm(
        llada_tiny_dir, additional_config={"decoding": {"cache": "dual", "threshold": 0.4}}
    )
    try:
        base = {"steps": 8, "block_length": 4}
        default = generate_ids(llm, PROMPTS[:2], params(base, ignore_eos=True))
        overridden = generate_ids(
            llm, PROMPTS[:2], params({**base, "cache": "none", "factor": 1.0}, ignore_eos=True)
        )
        for prompt, got, other in zip(PROMPTS, default, overridden, strict=False):
            plugin_mode = {**base, "cache": "dual", "threshold": 0.4}
            assert got == llada_tokens(llada_tiny, llada_mask, prompt, GEN, plugin_mode)
            request_mode = {**base, "cache": "none", "factor": 1.0}
            assert other == llada_tokens(llada_tiny, llada_mask, prompt, GEN, request_mode)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_step_graphs_replay_cached_steps_with_the_same_tokens(
    llada_tiny_dir, llada_tiny, llada_mask, stepped
):
    """`runner.cuda_graphs`: a cached step's layout seen twice is captured and replayed (eagerly
    on the CPU, through the same static buffers and first-step metadata as a CUDA graph). Tokens
    equal the oracle and the eager engine, alone and in a batch whose layout keeps changing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        args = {**ENGINE_DEFAULTS, "additional_config": {"runner": {"cuda_graphs": True}}}
        engine = LLMEngine.from_engine_args(EngineArgs(model=str(llada_tiny_dir), **args))
    try:
        modes = {
            "dual": {"steps": 16, "block_length": 8, "cache": "dual"},
            "prefix": {"steps": 16, "block_length": 8, "cache": "prefix"},
            "dual-threshold": {"steps": 8, "block_length": 8, "cache": "dual", "threshold": 0.4},
            "dual-sparsed": {
                **{"steps": 16, "block_length": 8, "cache": "dual", "sparsed": True},
                **{"sparsed_block_size": 16, "sparsed_skip": 0.0},
            },
        }
        requests = [
            (n, PROMPTS[i % 3], params(m, **DELTA)) for i, (n, m) in enumerate(modes.items())
        ]
        alone = {}
        for req_id, prompt, sp in requests:
            before = engine.collective_rpc(lambda w: w.model_runner.graph_replays)[0]
            got, _ = _run(engine, [(f"{req_id}-alone", prompt, sp.clone())])
            alone[req_id] = got[f"{req_id}-alone"]
            # Two blocks of 8: each has 7 cached steps, the first eager, the second captured.
            replays = engine.collective_rpc(lambda w: w.model_runner.graph_replays)[0] - before
            assert replays >= (10 if modes[req_id]["steps"] == 16 else 0), req_id
        batched, _ = _run(engine, requests[:2], joining=requests[2:])
        eager, _ = _run(stepped, [(f"{r}-eager", p, sp.clone()) for r, p, sp in requests])
        for req_id, prompt, _ in requests:
            assert alone[req_id] == batched[req_id] == eager[f"{req_id}-eager"], req_id
            if "sparsed" not in modes[req_id]:
                want = llada_tokens(llada_tiny, llada_mask, prompt, GEN, modes[req_id])
                assert alone[req_id] == want, req_id
        assert engine.collective_rpc(lambda w: w.model_runner._graph)[0] is None  # all finished
    finally:
        engine.engine_core.shutdown()
