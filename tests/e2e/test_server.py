"""`sparsed-vllm serve` (vLLM's OpenAI server) on 127.0.0.1, driven by the official client."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from servers import metric, wait_for
from vllm import SamplingParams

SPARSE = {"sparsed": True, "sparsed_block_size": 16}


def offline(llm, prompt, max_tokens, extra, **sampling):
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra, **sampling)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize(
    "sampling, extra",
    [
        (dict(temperature=0), {"steps": 16, "block_length": 8}),
        (dict(temperature=0), {"steps": 16, "block_length": 4, **SPARSE}),
        (dict(temperature=1.0, seed=7), {"steps": 16, "block_length": 8, "cfg_scale": 1.0}),
    ],
    ids=["greedy", "greedy-sparsed", "seeded-cfg"],
)
def test_completion_equals_offline(client, model, llada_llm, sampling, extra):
    prompt = "The quick brown fox jumps"
    got = client.completions.create(
        model=model, prompt=prompt, max_tokens=16, extra_body={"vllm_xargs": extra}, **sampling
    )
    expected = offline(llada_llm, prompt, 16, extra, **sampling)
    assert got.choices[0].text == expected.text
    assert got.usage.completion_tokens == len(expected.token_ids)
    assert got.usage.prompt_tokens == len(llada_llm.get_tokenizer().encode(prompt))


def test_chat_equals_offline_chat(client, model, llada_llm):
    messages = [{"role": "user", "content": "Name three colours."}]
    extra = {"steps": 16, "block_length": 8, **SPARSE}
    got = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=16,
        temperature=0,
        extra_body={"vllm_xargs": extra},
    )
    params = SamplingParams(max_tokens=16, temperature=0, extra_args=extra)
    expected = llada_llm.chat([messages], params, use_tqdm=False)[0]
    assert got.choices[0].message.content == expected.outputs[0].text
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_stream_sends_whole_blocks(client, model):
    extra = {"steps": 32, "block_length": 8}
    kwargs = dict(model=model, prompt="Once upon a time", max_tokens=32, temperature=0)
    full = client.completions.create(**kwargs, extra_body={"vllm_xargs": extra})
    chunks = list(
        client.completions.create(
            **kwargs,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"vllm_xargs": extra, "return_token_ids": True},
        )
    )
    pieces = [c.choices[0] for c in chunks if c.choices]
    token_counts = [len(p.token_ids or []) for p in pieces]
    # Tokens arrive only when a block is committed: every chunk holds whole 8-token blocks.
    assert sum(token_counts) == 32 and all(n % 8 == 0 for n in token_counts)
    assert len([n for n in token_counts if n]) > 1
    assert "".join(p.text for p in pieces) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 32


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=16, extra_body={"vllm_xargs": {"block_length": 5}}), "block_length"),
        (dict(max_tokens=16, extra_body={"vllm_xargs": {"block_length": 8, "steps": 3}}), "steps"),
        (dict(max_tokens=250), "max_tokens"),
        (dict(max_tokens=16, extra_body={"vllm_xargs": {"sparsed_select": 2}}), "sparsed_select"),
        (dict(max_tokens=16, extra_body={"vllm_xargs": {"sparsed_skip": -1}}), "sparsed_skip"),
        (dict(max_tokens=16, presence_penalty=1.0), "presence_penalty"),
        (dict(max_tokens=16, logprobs=2), "logprobs"),
        (dict(max_tokens=16, extra_body={"vllm_xargs": {"steps": 1e30}}), "steps"),
        (dict(max_tokens=16, extra_body={"vllm_xargs": {"steps": 17}}), "steps"),
        (dict(max_tokens=16, seed=2**70), "seed"),
    ],
)
def test_bad_input_is_http_400_naming_the_field(client, model, kwargs, field):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="word " * 10, temperature=0, **kwargs)
    assert info.value.status_code == 400
    assert field in info.value.message


def test_top_level_diffusion_fields_are_refused_with_a_pointer_to_vllm_xargs(server, model):
    body = {"model": model, "prompt": "hi", "max_tokens": 8, "steps": 8, "sparsed": 1}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "sparsed, steps must be sent inside vllm_xargs" in message
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "block_length": 8}
    response = httpx.post(f"{server}/v1/chat/completions", json=chat, timeout=30)
    assert response.status_code == 400
    assert "block_length must be sent inside vllm_xargs" in response.json()["error"]["message"]


def test_chat_without_max_tokens_gets_the_default_canvas(client, model):
    got = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"steps": 16, "block_length": 64}},
    )
    assert got.usage.completion_tokens == 128
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "word " * 90}], temperature=0
        )
    message = info.value.message
    assert "the default canvas of 128 tokens (the request sent no max_tokens)" in message
    assert "send max_tokens <= " in message


def test_prompt_tokens_are_counted(server, client, model):
    before = metric(server, "vllm:prompt_tokens_total")
    got = client.completions.create(model=model, prompt="count me in", max_tokens=8, temperature=0)
    assert wait_for(
        lambda: metric(server, "vllm:prompt_tokens_total") == before + got.usage.prompt_tokens
    )


def test_disconnect_aborts_and_frees_kv_memory(server, client, model):
    body = {
        "model": model,
        "prompt": "a long story",
        "max_tokens": 240,
        "temperature": 0,
        "stream": True,
        # A long cached request (one step per token): it holds KV pages while it runs.
        "vllm_xargs": {"steps": 240, "block_length": 8, "cache": "prefix"},
    }
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        # Keep the iterator referenced: closing it would close the connection early.
        lines = response.iter_lines()
        assert any(line.startswith("data: {") for line in lines)  # first committed block
        # Running, with its KV pages held (the gauges update a moment after the step); then
        # hang up mid-generation.
        assert wait_for(lambda: metric(server, "vllm:num_requests_running") == 1), "not running"
        assert wait_for(lambda: metric(server, "vllm:kv_cache_usage_perc") > 0), "no KV"
        response.close()
    assert wait_for(lambda: metric(server, "vllm:num_requests_running") == 0), "not aborted"
    assert wait_for(lambda: metric(server, "vllm:kv_cache_usage_perc") == 0), "not freed"
    ok = client.completions.create(model=model, prompt="still here", max_tokens=8, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_sixteen_concurrent_mixed_requests(server, client, model, llada_llm):
    def job(i):
        extra = {"steps": 4 * (1 + i % 4), "block_length": 8}
        if i % 2:
            extra.update(SPARSE)
        prompt = f"request number {i} " + "x " * (i % 5)
        if i % 4 == 3:
            messages = [{"role": "user", "content": prompt}]
            got = (
                client.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=16,
                    temperature=0,
                    extra_body={"vllm_xargs": extra},
                )
                .choices[0]
                .message.content
            )
            params = SamplingParams(max_tokens=16, temperature=0, extra_args=extra)
            return got, ("chat", messages, params)
        got = (
            client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=16,
                temperature=0,
                extra_body={"vllm_xargs": extra},
            )
            .choices[0]
            .text
        )
        return got, ("completion", prompt, extra)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(job, range(16)))
    for got, (kind, prompt, extra) in results:
        if kind == "chat":
            expected = llada_llm.chat([prompt], extra, use_tqdm=False)[0].outputs[0].text
        else:
            expected = offline(llada_llm, prompt, 16, extra, temperature=0).text
        assert got == expected
    assert wait_for(lambda: metric(server, "vllm:num_requests_running") == 0)
    assert wait_for(lambda: metric(server, "vllm:kv_cache_usage_perc") == 0)


def _sparsed_metrics(server: str) -> dict[str, float]:
    names = [
        "sparsed:pattern_pool_total_bytes",
        "sparsed:pattern_pool_used_bytes",
        "sparsed:selection_steps_total",
        "sparsed:cache_refreshes_total",
        "sparsed:kept_tile_fraction_count",
        "sparsed:denoising_steps_per_request_count",
        "sparsed:denoising_steps_per_request_sum",
        "sparsed:tokens_committed_per_step_count",
        "sparsed:tokens_committed_per_step_sum",
        "sparsed:requests_by_stage",
    ]
    return {name: metric(server, name) for name in names}


def test_sparsed_metrics_count_known_requests(server, client, model):
    before = _sparsed_metrics(server)
    kwargs = dict(model=model, temperature=0)
    # SparseD forced: 16 steps, skip 0.2 -> 4 dense steps, the selection at step 4, 11 sparse.
    sparse = {"steps": 16, "block_length": 8, **SPARSE}
    client.completions.create(
        prompt="word " * 40,
        max_tokens=16,
        **kwargs,
        extra_body={"vllm_xargs": sparse, "ignore_eos": True},
    )
    # Dual cache: 4 blocks of 8, 32 steps, one refresh per block.
    dual = {"steps": 32, "block_length": 8, "cache": "dual"}
    client.completions.create(
        prompt="word " * 20,
        max_tokens=32,
        **kwargs,
        extra_body={"vllm_xargs": dual, "ignore_eos": True},
    )
    assert wait_for(
        lambda: (
            _sparsed_metrics(server)["sparsed:denoising_steps_per_request_count"]
            == before["sparsed:denoising_steps_per_request_count"] + 2
        )
    )
    after = _sparsed_metrics(server)
    delta = {name: after[name] - before[name] for name in after}
    assert after["sparsed:pattern_pool_total_bytes"] == 1024 * 2**20
    assert after["sparsed:pattern_pool_used_bytes"] == 0
    assert after["sparsed:requests_by_stage"] == 0  # nothing running any more
    assert delta["sparsed:selection_steps_total"] == 1
    assert delta["sparsed:kept_tile_fraction_count"] == 1
    assert delta["sparsed:cache_refreshes_total"] == 4
    assert delta["sparsed:denoising_steps_per_request_sum"] == 16 + 32
    # One observation per request and step, together committing every canvas token.
    assert delta["sparsed:tokens_committed_per_step_count"] == 16 + 32
    assert delta["sparsed:tokens_committed_per_step_sum"] == 16 + 32
