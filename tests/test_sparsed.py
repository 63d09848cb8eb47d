"""SparseD schedule, settings and pattern-memory accounting (no vLLM)."""

import pytest
import torch

from sparsed_vllm.core.params import LLADA, resolve_params
from sparsed_vllm.core.request import DiffusionRequest
from sparsed_vllm.core.sparsed import (
    DENSE,
    SELECT,
    SPARSE,
    PatternStore,
    SparsedConfig,
    SparsedSettings,
    max_kept_tiles,
    pattern_bytes,
    resolve_sparsed,
)


def settings(**kw):
    base = dict(enabled=True, skip=0.2, select=0.3, block_size=128)
    return SparsedSettings(**{**base, **kw})


def stages(steps: int, sparsed: SparsedSettings, **extra) -> list[str]:
    """The SparseD stage of each step of a LLaDA request (one token per step, random logits)."""
    params = resolve_params(LLADA, {"steps": steps, **extra}, max_tokens=steps)
    request = DiffusionRequest([1, 2, 3], params, mask_id=7, sparsed=sparsed)
    generator = torch.Generator().manual_seed(0)
    seen = []
    while not request.finished:
        seen.append(request.stage())
        rows = request.plan().logit_rows.numel()
        request.advance(torch.randn(1, rows, 6, generator=generator))
    return seen


@pytest.mark.parametrize(
    "steps, expected",
    [(128, (26, 1, 101)), (1024, (205, 1, 818)), (32, (7, 1, 24)), (4, (1, 1, 2)), (1, (1, 0, 0))],
)
def test_schedule_counts_follow_the_paper(steps, expected):
    seen = stages(steps, settings())
    assert (seen.count(DENSE), seen.count(SELECT), seen.count(SPARSE)) == expected


def test_stage_boundaries_and_global_step():
    s = settings(skip=0.5)
    assert s.switch_step(10) == 6
    assert stages(10, s) == [DENSE] * 6 + [SELECT] + [SPARSE] * 3
    assert not settings(enabled=False).goes_sparse(100)
    assert stages(10, settings(skip=0.99)) == [DENSE] * 10
    # With a cache the selection waits for a refresh: switch 9, blocks of 4 refresh at 0, 4, 8, 12.
    assert s.switch_step(16) == 9
    cached = stages(16, s, block_length=4, cache="dual")
    assert cached == [DENSE] * 12 + [SELECT] + [SPARSE] * 3


def test_min_seq_len_and_forcing():
    config = SparsedConfig(min_seq_len=1000)
    assert not resolve_sparsed(config, None, seq_len=999).enabled
    assert resolve_sparsed(config, None, seq_len=1000).enabled
    assert resolve_sparsed(config, {"sparsed": True}, seq_len=10).enabled
    assert not resolve_sparsed(config, {"sparsed": False}, seq_len=10**6).enabled
    assert not resolve_sparsed(SparsedConfig(enabled=False), None, seq_len=10**6).enabled
    overrides = {"sparsed_skip": 0, "sparsed_select": 1, "sparsed_block_size": 32}
    s = resolve_sparsed(config, overrides, 5)
    assert (s.skip, s.select, s.block_size) == (0.0, 1.0, 32)


@pytest.mark.parametrize(
    "section, match",
    [
        ({"skip": 1}, r"sparsed.skip must be in \[0, 1\), got 1.0"),
        ({"select": 0}, r"sparsed.select must be in \(0, 1\], got 0.0"),
        ({"block_size": 48}, "sparsed.block_size must be one of"),
        ({"min_seq_len": -1}, "sparsed.min_seq_len must be an integer >= 0, got -1"),
        ({"pattern_pool_mb": -5}, "sparsed.pattern_pool_mb must be >= 0, got -5"),
        ({"scale": "sqrt"}, "sparsed.scale must be one of"),
        ({"enabled": "yes"}, "sparsed.enabled must be true or false"),
        ({"skipp": 0.1}, r"unknown sparsed setting\(s\) \['skipp'\]"),
    ],
)
def test_plugin_settings_are_validated(section, match):
    with pytest.raises(ValueError, match=match):
        SparsedConfig.from_additional_config({"sparsed": section})


def test_defaults_from_empty_additional_config():
    config = SparsedConfig.from_additional_config(None)
    assert (config.enabled, config.skip, config.select, config.block_size) == (True, 0.2, 0.3, 128)


def test_pattern_bytes_bound():
    s = settings(select=0.3, block_size=16)
    # 69 tokens, 32 generated: 5 tiles, generation starts at tile 3; 2 prompt + 1 gen kept.
    assert max_kept_tiles(69, 32, s) == 3
    assert pattern_bytes(69, 32, s, num_layers=2, num_heads=4) == 2 * 4 * 5 * (3 + 1) * 4
    assert pattern_bytes(69, 32, s, num_layers=2, num_heads=4, num_sequences=2) == 1280
    # LLaDA-8B at 64k, tiles of 128: 512 query tiles x (154 prompt + 1 generation kept + count)
    # int32 per layer and head; the paper quotes 246 MB for its own layout.
    big = pattern_bytes(65536, 128, settings(), num_layers=32, num_heads=32)
    assert big == 32 * 32 * 512 * (154 + 1 + 1) * 4


def test_pattern_store_drops_by_slot():
    store = PatternStore()
    store.put((3, 0), 0, "a")
    store.put((3, 1), 0, "b")
    store.put((4, 0), 1, "c")
    assert store.get((3, 1), 0) == "b" and store.slots() == {3, 4}
    store.drop(3)
    assert store.slots() == {4}
    with pytest.raises(RuntimeError, match="no SparseD pattern for slot"):
        store.get((3, 0), 0)


def test_derived_values_follow_their_pattern_and_slot():
    """A value derived from a pattern (the kept-tile lists of a cached window) is built once per
    tag, rebuilt when the tag or the pattern changes, and dropped with the slot."""
    store, built = PatternStore(), []

    def build(pattern):
        built.append(pattern)
        return f"lists of {pattern}"

    store.put((3, 0), 1, "p")
    assert store.derived((3, 0), 1, (2, 3), build) == "lists of p"
    assert store.derived((3, 0), 1, (2, 3), build) == "lists of p"
    assert built == ["p"]  # reused while the window stays in tiles 2-3
    store.derived((3, 0), 1, (3, 4), build)
    assert built == ["p", "p"]  # the window moved
    store.put((3, 0), 1, "q")
    assert store.derived((3, 0), 1, (3, 4), build) == "lists of q"
    store.drop(3)
    with pytest.raises(RuntimeError, match="no SparseD pattern"):
        store.derived((3, 0), 1, (3, 4), build)
    assert not store._derived
