"""Offline `LLM.generate` through real vLLM engines (CPU build) against the reference loops."""

import pytest
import torch
from engines import generate_ids, token_prompts
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

from sparsed_vllm.reference.generate import dream_generate, llada_generate


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], list(range(20, 61))]
GEN = 16


def cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """What vLLM returns for a finished canvas: everything up to and including the first stop."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def stop_ids(llm) -> set[int]:
    tokenizer = llm.get_tokenizer()
    return {tokenizer.eos_token_id}


@pytest.mark.parametrize(
    "case",
    [
        dict(steps=16, block_length=16),
        dict(steps=16, block_length=8),
        dict(steps=8, block_length=4),
        dict(steps=16, block_length=16, cfg_scale=1.0),
        dict(steps=16, block_length=8, cfg_scale=2.0),
        dict(steps=8, block_length=4, cfg_scale=0.5),
        dict(steps=16, block_length=4),
    ],
    ids=["B16", "B8", "B4", "B16-cfg1", "B8-cfg2", "B4-cfg0.5", "one-token-per-step"],
)
def test_llada_greedy_equals_reference(llada_llm, llada_tiny, llada_mask, case):
    params = SamplingParams(max_tokens=GEN, temperature=0, extra_args=case)
    got = generate_ids(llada_llm, PROMPTS, params)
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        ref = llada_generate(
            llada_tiny, torch.tensor([prompt]), gen_length=GEN, mask_id=llada_mask, **case
        )[0, len(prompt) :].tolist()
        assert tokens == cut_at_stop(ref, stop_ids(llada_llm))


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_greedy_equals_reference(dream_llm, dream_tiny, dream_mask, alg):
    params = SamplingParams(max_tokens=GEN, temperature=0, extra_args={"alg": alg, "steps": 12})
    got = generate_ids(dream_llm, PROMPTS, params)
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        ref = dream_generate(
            dream_tiny,
            torch.tensor([prompt]),
            max_new_tokens=GEN,
            steps=12,
            alg=alg,
            mask_id=dream_mask,
        )[0, len(prompt) :].tolist()
        assert tokens == cut_at_stop(ref, stop_ids(dream_llm))


def test_mixed_batch_equals_requests_alone(llada_llm):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], [7, 7, 7, 7]]
    params = [
        SamplingParams(max_tokens=16, temperature=0, extra_args={"steps": 16, "block_length": 4}),
        SamplingParams(max_tokens=8, temperature=0, extra_args={"steps": 4, "block_length": 8}),
        SamplingParams(
            max_tokens=24, temperature=0, extra_args={"block_length": 8, "cfg_scale": 1.0}
        ),
        SamplingParams(max_tokens=16, temperature=2.0, seed=9, extra_args={"remasking": "random"}),
    ]
    outs = llada_llm.generate(token_prompts(prompts), params, use_tqdm=False)
    together = [list(o.outputs[0].token_ids) for o in outs]
    alone = [generate_ids(llada_llm, [p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert together == alone
    assert all(0 < len(t) <= n for t, n in zip(together, [16, 8, 24, 16], strict=True))


def test_seeded_sampling_is_reproducible(llada_llm, dream_llm):
    def run(llm, seed, extra):
        params = SamplingParams(max_tokens=GEN, temperature=2.0, seed=seed, extra_args=extra)
        return generate_ids(llm, [PROMPTS[0]], params)[0]

    llada_extra = {"steps": 16, "block_length": 8}
    assert run(llada_llm, 5, llada_extra) == run(llada_llm, 5, llada_extra)
    assert run(llada_llm, 5, llada_extra) != run(llada_llm, 6, llada_extra)
    dream_extra = {"alg": "entropy", "steps": 8}
    assert run(dream_llm, 5, dream_extra) == run(dream_llm, 5, dream_extra)
    assert run(dream_llm, 5, dream_extra) != run(dream_llm, 6, dream_extra)


def _worker_logits(worker, token_ids):
    runner = worker.model_runner
    with torch.inference_mode():
        hidden = runner._forward([torch.tensor(token_ids)])
        return runner.model.compute_logits(hidden).cpu()


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_model_logits_match_reference(which, request):
    llm = request.getfixturevalue(f"{which}_llm")
    ref_model = request.getfixturevalue(f"{which}_tiny")
    mask = request.getfixturevalue(f"{which}_mask")
    ids = PROMPTS[2] + [mask] * 9
    got = llm.collective_rpc(_worker_logits, args=(ids,))[0]
    ref = ref_model(torch.tensor([ids]))[0]
    assert not torch.isnan(got).any()
    # fp32 on both sides; differences are summation order only.
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(extra_args={"block_length": 5}),
            "max_tokens (gen length) 16 is not divisible by block_length 5",
        ),
        (
            dict(extra_args={"block_length": 8, "steps": 3}),
            "steps 3 is not divisible by the number of blocks 2",
        ),
        (dict(extra_args={"remasking": "best"}), "remasking must be one of"),
        (dict(extra_args={"unknown_knob": 1}), "unknown extra_args key 'unknown_knob'"),
        (dict(presence_penalty=0.5), "not supported by diffusion decoding: presence_penalty"),
        (dict(logprobs=2), "not supported by diffusion decoding: logprobs"),
        (dict(temperature=1.0, top_p=0.5), "top_p=0.5"),
        # More steps than tokens would commit nothing at the extra steps.
        (dict(extra_args={"steps": 32, "block_length": 8}), "steps must be <= 16, got 32"),
    ],
)
def test_invalid_requests_raise_naming_the_value(llada_llm, kwargs, message):
    params = SamplingParams(max_tokens=16, **{"temperature": 0, **kwargs})
    with pytest.raises(VLLMValidationError) as info:
        llada_llm.generate(token_prompts([[1, 2, 3]]), params, use_tqdm=False)
    assert message in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


def test_too_long_request_is_refused_and_engine_keeps_serving(llada_llm):
    max_model_len = llada_llm.llm_engine.vllm_config.model_config.max_model_len
    params = SamplingParams(max_tokens=16, temperature=0)
    long_prompt = list(range(1, max_model_len - 8))  # fits alone, not with its 16-token canvas
    with pytest.raises(VLLMValidationError) as info:
        llada_llm.generate(token_prompts([[1, 2, 3], long_prompt]), params, use_tqdm=False)
    message = str(info.value)
    assert f"prompt ({len(long_prompt)} tokens) + max_tokens (16)" in message
    assert f"exceeds the model length {max_model_len}" in message
    # A canvas that fits exactly is served; the refused batch left nothing behind.
    fits = list(range(1, max_model_len - 16 + 1))
    outs = llada_llm.generate(token_prompts([fits, [1, 2, 3]]), params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) > 0 for o in outs] == [True, True]
    assert llada_llm.llm_engine.get_num_unfinished_requests() == 0


def test_text_prompt_detokenizes_and_stops_at_stop_token(llada_llm):
    params = SamplingParams(
        max_tokens=16, temperature=0, extra_args={"block_length": 8, "steps": 8}
    )
    full = llada_llm.generate(["The quick brown fox"], params, use_tqdm=False)[0].outputs[0]
    assert len(full.token_ids) >= 1
    tokenizer = llada_llm.get_tokenizer()
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    # Stopping on a token that occurs mid-canvas truncates there; the stop token is not in the text.
    stop = full.token_ids[min(5, len(full.token_ids) - 1)]
    first = list(full.token_ids).index(stop)
    params.stop_token_ids = [stop]
    cut = llada_llm.generate(["The quick brown fox"], params, use_tqdm=False)[0].outputs[0]
    assert list(cut.token_ids) == list(full.token_ids[: first + 1])
    assert cut.finish_reason == "stop"
    assert cut.text == tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)


def _runner_request_ids(worker):
    # vLLM suffixes external request ids internally ("stream" -> "stream-1a2b...").
    return sorted(r.rsplit("-", 1)[0] for r in worker.model_runner.requests)


@pytest.fixture(scope="module")
def stepped_engine(llada_tiny_dir, monkeypatch_module):
    """An engine whose core runs in this process, so each `step()` is exactly one engine step."""
    from vllm import EngineArgs, LLMEngine

    monkeypatch_module.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = LLMEngine.from_engine_args(
        EngineArgs(
            model=str(llada_tiny_dir), dtype="float32", enforce_eager=True, max_model_len=256
        )
    )
    yield engine
    engine.engine_core.shutdown()


def test_each_step_is_one_denoising_step_and_blocks_stream(stepped_engine):
    engine = stepped_engine
    delta = dict(temperature=0, output_kind=RequestOutputKind.DELTA, ignore_eos=True)
    stream = SamplingParams(max_tokens=16, extra_args={"steps": 8, "block_length": 4}, **delta)
    engine.add_request("stream", {"prompt_token_ids": PROMPTS[0]}, stream)
    engine.add_request(
        "aborted",
        {"prompt_token_ids": PROMPTS[1]},
        SamplingParams(max_tokens=32, extra_args={"steps": 32}, **delta),
    )
    chunks, step = [], 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            assert out.request_id != "aborted" or not out.outputs[0].token_ids
            if out.request_id == "stream" and out.outputs[0].token_ids:
                chunks.append((step, list(out.outputs[0].token_ids)))
        if step == 3:
            assert engine.collective_rpc(_runner_request_ids)[0] == ["aborted", "stream"]
            engine.abort_request(["aborted"])
    # 8 steps over 4 blocks: one 4-token block at every second step, nothing in between.
    assert chunks == [(2, chunks[0][1]), (4, chunks[1][1]), (6, chunks[2][1]), (8, chunks[3][1])]
    assert [len(c) for _, c in chunks] == [4, 4, 4, 4]
    engine.add_request("again", {"prompt_token_ids": PROMPTS[0]}, stream.clone())
    again = []
    while engine.has_unfinished_requests():
        again += [t for out in engine.step() for t in out.outputs[0].token_ids]
    assert again == [t for _, c in chunks for t in c]
    # The aborted request's worker state is gone.
    assert engine.collective_rpc(_runner_request_ids)[0] == []


def test_dummy_load_format_serves_a_weightless_checkpoint(tmp_path):
    """`load_format="dummy"` (vLLM's random weights, for speed runs) works with the plugin."""
    from engines import make_llm

    from sparsed_vllm.checkpoint import write_checkpoint

    out = write_checkpoint(tmp_path / "ckpt", "llada", preset="tiny", weights=False)
    llm = make_llm(out, load_format="dummy")
    try:
        params = SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True, extra_args={"steps": 8}
        )
        ids = generate_ids(llm, [[5, 6, 7]], params)[0]
        assert len(ids) == 16
    finally:
        llm.llm_engine.engine_core.shutdown()
