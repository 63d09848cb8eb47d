"""Admission and the capability table: what fails, fails here with the field's name (no vLLM)."""

import dataclasses

import pytest
import torch

from sparsed_vllm.core.admission import EngineLimits, admit
from sparsed_vllm.core.capabilities import (
    EXACT,
    EXACT_BACKEND,
    TRITON,
    TRITON_BACKEND,
    fallback_reason,
    select_backend,
)
from sparsed_vllm.core.errors import ParameterError
from sparsed_vllm.core.params import DREAM, LLADA, SEED_RANGE
from sparsed_vllm.core.sparsed import SparsedConfig


def limits(backend=EXACT_BACKEND, family=LLADA, **kw):
    base = dict(
        family=family,
        defaults={},
        sparsed=SparsedConfig(),
        backend=backend,
        max_model_len=4096,
        max_step_tokens=8192,
        num_layers=2,
        num_heads=4,
    )
    return EngineLimits(**{**base, **kw})


@pytest.mark.parametrize(
    "device, dtype, head_dim, expected",
    [
        ("cuda", torch.bfloat16, 128, TRITON),
        ("cuda", torch.float16, 64, TRITON),
        ("cuda", torch.bfloat16, 32, EXACT),
        ("cuda", torch.bfloat16, 96, EXACT),
        ("cuda", torch.float32, 128, EXACT),
        ("cpu", torch.bfloat16, 128, EXACT),
        ("cpu", torch.float32, 16, EXACT),
    ],
)
def test_dispatch_picks_triton_only_where_the_kernels_run(device, dtype, head_dim, expected):
    assert select_backend(device, dtype, head_dim).name == expected


def test_cuda_dispatch_refuses_tile_256_without_a_gpu():
    backend = select_backend("cuda", torch.bfloat16, 128)
    with pytest.raises(ParameterError, match="sparsed_block_size must be one of") as info:
        admit(
            limits(backend),
            prompt_len=100,
            max_tokens=32,
            extra_args={"sparsed": True, "sparsed_block_size": 256},
        )
    assert info.value.name == "sparsed_block_size"
    # The exact path runs 256, and a CPU engine admits the same request.
    cpu = limits(select_backend("cpu", torch.bfloat16, 128))
    extra = {"sparsed": True, "sparsed_block_size": 256}
    assert admit(cpu, prompt_len=100, max_tokens=32, extra_args=extra).sparsed.block_size == 256


def test_plugin_wide_tile_the_kernels_cannot_run_fails_at_start_up():
    with pytest.raises(ParameterError, match="sparsed.block_size must be one of"):
        limits(TRITON_BACKEND, sparsed=SparsedConfig(block_size=256))
    assert limits(EXACT_BACKEND, sparsed=SparsedConfig(block_size=256))


def test_kernel_checks_read_the_same_table():
    utils = pytest.importorskip("sparsed_vllm.kernels.utils")
    assert utils.SUPPORTED_TILES == TRITON_BACKEND.tile_sizes
    assert utils.SUPPORTED_HEAD_DIMS == TRITON_BACKEND.head_dims
    assert utils.SUPPORTED_DTYPES == TRITON_BACKEND.dtypes


def test_head_dim_fallback_is_explained_once_at_start_up():
    assert "head_dim 32" in fallback_reason("cuda", torch.bfloat16, 32)
    assert fallback_reason("cuda", torch.bfloat16, 128) is None
    assert fallback_reason("cuda", torch.float32, 32) is None  # fp32 is exact on purpose
    assert fallback_reason("cpu", torch.bfloat16, 32) is None


@pytest.mark.parametrize(
    "extra, name, match",
    [
        ({"steps": 1e30}, "steps", "steps must be <= 32, got 1000000000000000019884624838656"),
        ({"steps": 10**9}, "steps", "steps must be <= 32"),
        ({"steps": 33}, "steps", "steps must be <= 32, got 33"),
        ({"steps": 10**400}, "steps", "steps must be <= 32"),
        ({"steps": float("inf")}, "steps", "steps must be an integer"),
        ({"block_length": 64}, "block_length", "block_length must be <= 32"),
        ({"cfg_scale": 10**400}, "cfg_scale", "cfg_scale must be finite"),
        ({"cfg_scale": float("nan")}, "cfg_scale", "cfg_scale must be finite"),
        ({"sparsed_skip": 10**400}, "sparsed_skip", "sparsed_skip must be finite"),
        ({"sparsed_select": "0.5"}, "sparsed_select", "must be a number"),
        ({"sparsed": 2}, "sparsed", "sparsed must be true or false"),
        ({"bogus": 1}, "bogus", "unknown extra_args key 'bogus'"),
    ],
)
def test_numeric_fields_are_bounded_and_named(extra, name, match):
    with pytest.raises(ParameterError, match=match) as info:
        admit(limits(), prompt_len=10, max_tokens=32, extra_args=extra)
    assert info.value.name == name


@pytest.mark.parametrize("seed", [2**70, -(2**63) - 1, 2**64])
def test_seed_out_of_torch_range_is_refused(seed):
    with pytest.raises(ParameterError, match="seed must be") as info:
        admit(limits(), prompt_len=10, max_tokens=32, extra_args=None, seed=seed)
    assert info.value.name == "seed"
    for ok in SEED_RANGE:
        torch.Generator().manual_seed(ok)
        assert admit(limits(), prompt_len=10, max_tokens=32, extra_args=None, seed=ok)


def test_checkpoint_default_steps_are_capped_at_the_canvas():
    dream = limits(family=DREAM, defaults={"steps": 512, "alg": "entropy"})
    assert admit(dream, prompt_len=5, max_tokens=16, extra_args=None).params.steps == 16
    assert admit(dream, prompt_len=5, max_tokens=1024, extra_args=None).params.steps == 512
    with pytest.raises(ParameterError, match="steps must be <= 16, got 17"):
        admit(dream, prompt_len=5, max_tokens=16, extra_args={"steps": 17})


def test_dream_alg_temp_lower_bound():
    dream = limits(family=DREAM)
    with pytest.raises(ParameterError, match="alg_temp must be 0 or >= 0.0001"):
        admit(dream, prompt_len=5, max_tokens=8, extra_args={"alg_temp": 1e-30})
    assert admit(dream, prompt_len=5, max_tokens=8, extra_args={"alg_temp": 0}).params


def test_canvas_budget_and_pattern_pool_are_checked_at_admission():
    with pytest.raises(ParameterError, match="exceeds the model length 4096") as info:
        admit(limits(), prompt_len=4000, max_tokens=128, extra_args=None)
    assert info.value.name == "max_tokens"
    with pytest.raises(ParameterError, match="max_num_batched_tokens=1000"):
        admit(limits(max_step_tokens=1000), prompt_len=600, max_tokens=512, extra_args=None)
    tiny_pool = limits(sparsed=SparsedConfig(pattern_pool_mb=0.0001))
    with pytest.raises(ParameterError, match="more than the whole pattern pool") as info:
        admit(tiny_pool, prompt_len=600, max_tokens=64, extra_args={"sparsed": True})
    assert info.value.name == "sparsed"
    ok = admit(limits(), prompt_len=600, max_tokens=64, extra_args={"sparsed": True})
    assert ok.pattern_bytes > 0 and ok.seq_len == 664 and ok.step_tokens == 664
    with pytest.raises(ParameterError, match="at least one token"):
        admit(limits(), prompt_len=0, max_tokens=8, extra_args=None)


def test_sparsed_on_the_cache_runs_where_the_backend_has_the_path():
    extra = {"cache": "dual", "sparsed": True, "steps": 32, "block_length": 8}
    for backend in (TRITON_BACKEND, EXACT_BACKEND):
        ok = admit(limits(backend), prompt_len=100, max_tokens=32, extra_args=extra)
        assert ok.sparsed.enabled and ok.pattern_bytes > 0
    # A backend without the path refuses a forced request at the front end...
    without = dataclasses.replace(TRITON_BACKEND, name="partial", cached_sparse=False)
    with pytest.raises(ParameterError, match="not run by the partial attention backend") as info:
        admit(limits(without), prompt_len=100, max_tokens=32, extra_args=extra)
    assert info.value.name == "sparsed"
    # ... and a plugin-wide SparseD (min_seq_len reached, not forced) leaves cached requests dense.
    plugin_wide = limits(without, sparsed=SparsedConfig(min_seq_len=0))
    dual = {"cache": "dual", "steps": 32, "block_length": 8}
    assert not admit(plugin_wide, prompt_len=100, max_tokens=32, extra_args=dual).sparsed.enabled
