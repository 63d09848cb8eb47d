"""Resolution and validation of per-request diffusion parameters (no vLLM)."""

import pytest

from sparsed_vllm.core.params import (
    DREAM,
    LLADA,
    DiffusionParams,
    diffusion_defaults,
    family_of,
    resolve_params,
)


def test_llada_defaults_one_block_one_token_per_step():
    p = resolve_params(LLADA, None, max_tokens=32)
    assert (p.gen_length, p.steps, p.block_length, p.num_blocks) == (32, 32, 32, 1)
    assert (p.remasking, p.cfg_scale, p.num_sequences) == ("low_confidence", 0.0, 1)


def test_request_values_override_checkpoint_defaults():
    defaults = {"steps": 64, "block_length": 8, "alg": "entropy"}
    p = resolve_params(LLADA, {"steps": 16}, max_tokens=32, defaults=defaults)
    assert (p.steps, p.block_length, p.num_blocks, p.steps_per_block) == (16, 8, 4, 4)
    d = resolve_params(DREAM, {}, max_tokens=64, defaults=defaults)
    assert (d.steps, d.alg, d.block_length) == (64, "entropy", 64)
    # A default beyond one step per token is capped (a request's own value is refused).
    assert resolve_params(DREAM, {}, max_tokens=32, defaults=defaults).steps == 32


def test_cfg_runs_two_sequences():
    p = resolve_params(LLADA, {"cfg_scale": 0.5}, max_tokens=8)
    assert p.num_sequences == 2


@pytest.mark.parametrize(
    "family, extra, max_tokens, match",
    [
        (LLADA, {"block_length": 5}, 16, "not divisible by block_length 5"),
        (
            LLADA,
            {"block_length": 8, "steps": 3},
            16,
            "steps 3 is not divisible by the number of blocks 2",
        ),
        (LLADA, {"remasking": "greedy"}, 16, "remasking must be one of .* got 'greedy'"),
        (LLADA, {"cfg_scale": -1}, 16, "cfg_scale must be >= 0, got -1"),
        (LLADA, {"alg": "entropy"}, 16, "'alg' does not apply to llada"),
        (LLADA, {"bogus": 1}, 16, "unknown extra_args key 'bogus'"),
        (LLADA, {"steps": 0}, 16, "steps must be >= 1, got 0"),
        (LLADA, {"steps": 2.5}, 16, "steps must be an integer, got 2.5"),
        (LLADA, {"steps": "8"}, 16, "steps must be a number, got '8'"),
        (DREAM, {"alg": "best"}, 16, "alg must be one of .* got 'best'"),
        (DREAM, {"eps": 1.5}, 16, r"eps must be in \(0, 1\), got 1.5"),
        (DREAM, {"alg_temp": -0.1}, 16, "alg_temp must be 0 or >= 0.0001, got -0.1"),
        (
            DREAM,
            {"block_length": 8},
            16,
            "block_length applies to Dream only in its blockwise modes",
        ),
        (DREAM, {}, 0, "max_tokens .* must be >= 1, got 0"),
    ],
)
def test_invalid_values_name_the_value(family, extra, max_tokens, match):
    with pytest.raises(ValueError, match=match):
        resolve_params(family, extra, max_tokens=max_tokens)


def test_llada_rejects_top_p_and_top_k():
    with pytest.raises(ValueError, match="top_p=0.9"):
        resolve_params(LLADA, None, max_tokens=8, top_p=0.9)
    with pytest.raises(ValueError, match="top_k=5"):
        resolve_params(LLADA, None, max_tokens=8, top_k=5)


def test_dream_keeps_sampling_filters():
    p = resolve_params(
        DREAM, {"alg": "topk_margin"}, max_tokens=8, temperature=0.5, top_p=0.9, top_k=20, seed=7
    )
    assert (p.temperature, p.top_p, p.top_k, p.seed) == (0.5, 0.9, 20, 7)
    assert resolve_params(DREAM, None, max_tokens=8, top_k=-1).top_k == 0


def test_params_round_trip_through_dict():
    p = resolve_params(
        LLADA, {"block_length": 4, "steps": 8, "cfg_scale": 1.0}, max_tokens=16, seed=3
    )
    assert DiffusionParams(**p.to_dict()) == p


def test_generation_config_keys_and_family():
    assert diffusion_defaults(
        {"steps": 512, "alg": "origin", "alg_temp": None, "temperature": 0.2}
    ) == {
        "steps": 512,
        "alg": "origin",
    }
    assert family_of("LLaDAModelLM") == LLADA and family_of("DreamModel") == DREAM
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        family_of("LlamaForCausalLM")


def test_runner_config_is_validated():
    from sparsed_vllm.core.params import RunnerConfig

    assert RunnerConfig.from_additional_config(None) == RunnerConfig(cuda_graphs=False)
    assert RunnerConfig.from_additional_config({"runner": {"cuda_graphs": True}}).cuda_graphs
    with pytest.raises(ValueError, match="unknown runner setting"):
        RunnerConfig.from_additional_config({"runner": {"graphs": True}})
    with pytest.raises(ValueError, match="true or false"):
        RunnerConfig.from_additional_config({"runner": {"cuda_graphs": 1}})
    with pytest.raises(ValueError, match="must be an object"):
        RunnerConfig.from_additional_config({"runner": True})
    assert RunnerConfig().sparse_kernel == "auto"
    fa4 = RunnerConfig.from_additional_config({"runner": {"sparse_kernel": "fa4"}})
    assert fa4.sparse_kernel == "fa4"
    with pytest.raises(ValueError, match="sparse_kernel must be one of"):
        RunnerConfig.from_additional_config({"runner": {"sparse_kernel": "flash"}})
    assert RunnerConfig().cached_kernel == "auto"
    fa3 = RunnerConfig.from_additional_config({"runner": {"cached_kernel": "fa3"}})
    assert (fa3.cached_kernel, fa3.sparse_kernel) == ("fa3", "auto")
    with pytest.raises(ValueError, match="cached_kernel must be one of"):
        RunnerConfig.from_additional_config({"runner": {"cached_kernel": "fa4"}})
    with pytest.raises(ValueError, match="supported: cuda_graphs, sparse_kernel, cached_kernel"):
        RunnerConfig.from_additional_config({"runner": {"dense_kernel": "fa3"}})
