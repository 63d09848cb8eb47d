"""Cached and parallel diffusion decoding (Fast-dLLM): the oracle for the engine's fast paths.

Transcriptions of Fast-dLLM's block loops (Wu et al., arXiv 2505.22618,
https://github.com/NVlabs/Fast-dLLM): LLaDA's `generate`, `generate_with_prefix_cache` and
`generate_with_dual_cache` with `get_transfer_index` / `get_transfer_index_dynamic`, and Dream's
blockwise `_sample`. CACHED.md states the semantics and every deliberate difference from the
published code. Batch size 1. `model` is a reference model (models.py): `forward_hidden` and
`compute_logits`, and for the cached modes `forward_with_kv` and `forward_window`. Every random
draw takes the optional `generator` (torch's global RNG without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sparsed_vllm.reference.generate import (
    _require,
    _validate_dream,
    _validate_llada,
    get_num_transfer_tokens,
    sample_tokens,
)

CACHE_MODES = ("none", "prefix", "dual")


class DecodeResult(NamedTuple):
    """x: the final canvas [1, P + gen]; nfe: model forwards (full or window); commits: the
    number of positions committed by each forward, in order (len(commits) == nfe)."""

    x: torch.Tensor
    nfe: int
    commits: list[int]


# Commit rules on the candidates of one step (LLaDA and Dream)


def select_top_k(confidence: torch.Tensor, k: int) -> torch.Tensor:
    """The k most confident candidates (torch.topk). confidence: [n] -> bool [n]."""
    chosen = torch.zeros_like(confidence, dtype=torch.bool)
    chosen[torch.topk(confidence, k).indices] = True
    return chosen


def select_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every candidate with confidence >= threshold, and always the most confident one
    (torch.argmax: the first on ties). confidence: [n], n >= 1 -> bool [n]."""
    chosen = confidence >= threshold
    chosen[torch.argmax(confidence)] = True
    return chosen


def factor_transfer_count(confidence: torch.Tensor, factor: float) -> int:
    """How many candidates Fast-dLLM's `get_transfer_index_dynamic` commits. confidence: [n].

    Sorted descending c_0 >= c_1 >= ..., thresholds t_j = 1 - factor / (j + 2) with t_0 = -1:
    the count is the first j with c_j < t_j (n - 1 when there is none), plus one when that is
    0 or n - 1 (the published boundary rule: a failing last candidate is committed too).
    """
    n = confidence.shape[0]
    ordered = torch.sort(confidence, descending=True).values.tolist()
    thresholds = [-1.0] + [1 - factor / (j + 2) for j in range(1, n)]
    count = next((j for j in range(n) if ordered[j] < thresholds[j]), n - 1)
    return count + 1 if count in (0, n - 1) else count


def select_factor(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """The `factor_transfer_count` most confident candidates. confidence: [n] -> bool [n]."""
    return select_top_k(confidence, factor_transfer_count(confidence, factor))


@dataclass(frozen=True)
class _Parallel:
    """Fast-dLLM's parallel commit: a confidence threshold or a factor, at most one of them."""

    threshold: float | None
    factor: float | None

    def __post_init__(self) -> None:
        threshold, factor = self.threshold, self.factor
        _require(
            threshold is None or 0 < threshold <= 1, f"threshold must be in (0, 1], got {threshold}"
        )
        _require(factor is None or factor > 0, f"factor must be > 0, got {factor}")
        _require(
            threshold is None or factor is None,
            f"give threshold or factor, not both (threshold={threshold}, factor={factor})",
        )

    @property
    def enabled(self) -> bool:
        return self.threshold is not None or self.factor is not None

    def select(self, confidence: torch.Tensor) -> torch.Tensor:
        """confidence: [n] -> bool [n] by the threshold or the factor rule."""
        if self.threshold is not None:
            return select_threshold(confidence, self.threshold)
        return select_factor(confidence, self.factor)


# The forward of one block step under a cache mode


class _BlockForward:
    """Runs the forward of a block step under a cache mode and counts the forwards (nfe).

    "none": a full forward every step. "prefix" / "dual": a `refresh` step is a full forward that
    also keeps the K/V of every position; the other steps run the window [start, L) (prefix) or
    [start, end) (dual) against the last refresh's K/V.
    """

    def __init__(self, model: Any, cache: str) -> None:
        self.model, self.cache = model, cache
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.nfe = 0

    def __call__(
        self, x: torch.Tensor, start: int, end: int, refresh: bool
    ) -> tuple[torch.Tensor, int]:
        """x: [1, L] -> (hidden [n, hidden] of the positions computed, the first one's position)."""
        self.nfe += 1
        if self.cache == "none":
            return self.model.forward_hidden(x)[0], 0
        if refresh:
            hidden, self.kv = self.model.forward_with_kv(x)
            return hidden[0], 0
        window_end = x.shape[1] if self.cache == "prefix" else end
        return self.model.forward_window(x[:, start:window_end], start, self.kv)[0], start


def _masked_positions(x: torch.Tensor, start: int, end: int, mask_id: int) -> torch.Tensor:
    """Absolute positions of the [MASK] tokens of x[0, start:end]. -> [n] long."""
    return (x[0, start:end] == mask_id).nonzero().flatten() + start


# LLaDA


def llada_proposals(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x0 of the candidate rows. logits: [n, V] -> [n] long.

    argmax; with temperature > 0 argmax of exp(logits) / (-log U)**temperature in float64, U
    uniform [n, V] (LLaDA's Gumbel-max, drawn for the candidate rows only).
    """
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return torch.argmax(logits.exp() / (-torch.log(noise)) ** temperature, dim=-1)


@dataclass(frozen=True)
class _LLaDARule:
    """How a LLaDA step proposes and commits tokens."""

    parallel: _Parallel
    temperature: float
    remasking: str
    generator: torch.Generator | None

    def select(self, logits: torch.Tensor, num_transfer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: [n, V] fp32 of the candidates -> (x0 [n], chosen bool [n]).

        Schedule rule: the `num_transfer` most confident, confidence in float32 (softmax prob of
        x0, or uniform random for remasking "random"). Threshold / factor: confidence is the
        float64 softmax prob of x0.
        """
        x0 = llada_proposals(logits, self.temperature, self.generator)
        if self.parallel.enabled:
            probs = F.softmax(logits.to(torch.float64), dim=-1)
            return x0, self.parallel.select(probs.gather(-1, x0[:, None]).squeeze(-1))
        if self.remasking == "low_confidence":
            confidence = F.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
        else:
            confidence = torch.rand(x0.shape, device=x0.device, generator=self.generator)
        return x0, select_top_k(confidence, num_transfer)


def _validate_llada_fast(
    prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, rule: _LLaDARule
) -> None:
    _validate_llada(prompt, steps, gen_length, block_length, rule.temperature, 0.0, rule.remasking)
    _require(prompt.shape[0] == 1, f"batch size must be 1, got {prompt.shape[0]}")
    steps_per_block = steps // (gen_length // block_length)
    _require(
        steps_per_block <= block_length,
        f"steps {steps} give {steps_per_block} steps per block, more than block_length "
        f"{block_length}",
    )
    _require(
        rule.remasking == "low_confidence" or not rule.parallel.enabled,
        f"remasking {rule.remasking!r} cannot be combined with threshold or factor",
    )


@torch.no_grad()
def _llada_decode(
    model: Any,
    prompt: torch.Tensor,
    cache: str,
    sizes: tuple[int, int, int],
    mask_id: int,
    rule: _LLaDARule,
) -> DecodeResult:
    """The LLaDA block loop of the three cache modes. sizes: (steps, gen_length, block_length)."""
    steps, gen_length, block_length = sizes
    _validate_llada_fast(prompt, steps, gen_length, block_length, rule)
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    steps_per_block = steps // (gen_length // block_length)
    forward, commits = _BlockForward(model, cache), []
    for start in range(prompt.shape[1], x.shape[1], block_length):
        end = start + block_length
        schedule = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)[0]
        # Parallel rules run until the block has no [MASK] left; block_length steps bound that
        # should a proposal be the [MASK] token itself.
        for step in range(block_length if rule.parallel.enabled else steps_per_block):
            positions = _masked_positions(x, start, end, mask_id)
            if positions.numel() == 0:
                break
            hidden, offset = forward(x, start, end, refresh=step == 0)
            logits = model.compute_logits(hidden[positions - offset]).float()  # [n, V]
            quota = 0 if rule.parallel.enabled else int(schedule[step])
            x0, chosen = rule.select(logits, quota)
            x[0, positions[chosen]] = x0[chosen]
            commits.append(int(chosen.sum()))
    return DecodeResult(x, forward.nfe, commits)


def llada_generate_fast(
    model: Any,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
    threshold: float | None = None,
    factor: float | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """LLaDA block loop, a full forward every step (Fast-dLLM `generate`). prompt: [1, P].

    Blocks of block_length, left to right, steps / num_blocks steps each; candidates are the
    current block's [MASK] positions. Without threshold / factor each step commits LLaDA's
    schedule (as `llada_generate`); with one of them each step commits by that rule and the
    block runs until it has no [MASK] left. -> DecodeResult(x [1, P + gen_length], nfe, commits).
    """
    rule = _LLaDARule(_Parallel(threshold, factor), temperature, remasking, generator)
    sizes = (steps, gen_length, block_length)
    return _llada_decode(model, prompt, "none", sizes, mask_id, rule)


def llada_generate_with_prefix_cache(
    model: Any,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
    threshold: float | None = None,
    factor: float | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """`llada_generate_fast` with a prefix cache (Fast-dLLM `generate_with_prefix_cache`).

    A block's first step is a full forward that keeps every position's K/V; its later steps run
    the window [block_start, L) against the cached K/V of [0, block_start).
    """
    rule = _LLaDARule(_Parallel(threshold, factor), temperature, remasking, generator)
    sizes = (steps, gen_length, block_length)
    return _llada_decode(model, prompt, "prefix", sizes, mask_id, rule)


def llada_generate_with_dual_cache(
    model: Any,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
    threshold: float | None = None,
    factor: float | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """`llada_generate_fast` with a dual cache (Fast-dLLM `generate_with_dual_cache`).

    A block's first step is a full forward that keeps every position's K/V; its later steps run
    the window [block_start, block_end) against the cached K/V of all positions.
    """
    rule = _LLaDARule(_Parallel(threshold, factor), temperature, remasking, generator)
    sizes = (steps, gen_length, block_length)
    return _llada_decode(model, prompt, "dual", sizes, mask_id, rule)


# Dream


def _dream_rows(positions: torch.Tensor, offset: int) -> torch.Tensor:
    """Rows of a forward over [offset, ...) that predict `positions`. -> [n] long.

    Dream predicts position j from row j - 1; the first computed position, with no row before
    it, reads its own (Dream's shift `cat([logits[:, :1], logits[:, :-1]])`).
    """
    return (positions - 1).clamp(min=offset) - offset


@dataclass(frozen=True)
class _DreamRule:
    """How a Dream block step samples and commits tokens."""

    parallel: _Parallel
    alg: str
    alg_temp: float | None
    temperature: float
    top_p: float | None
    top_k: int | None
    generator: torch.Generator | None

    def sample(self, logits: torch.Tensor, **flags: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Dream's sampler. logits: [n, V] -> (confidence [n], x0 [n])."""
        return sample_tokens(
            logits, self.temperature, self.top_p, self.top_k, generator=self.generator, **flags
        )

    def select_scheduled(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k candidates by the `alg` score: top-k, or drawn with alg_temp. -> (x0, chosen)."""
        # "origin" has no score of its own; Fast-dLLM's block loop scores by negative entropy.
        neg_entropy = self.alg in ("entropy", "origin")
        confidence, x0 = self.sample(
            logits, margin_confidence=self.alg == "topk_margin", neg_entropy=neg_entropy
        )
        chosen = torch.zeros_like(x0, dtype=torch.bool)
        if k == 0:
            return x0, chosen
        if not self.alg_temp:
            return x0, select_top_k(confidence, k)
        weights = F.softmax(confidence / self.alg_temp, dim=-1)
        chosen[torch.multinomial(weights, num_samples=k, generator=self.generator)] = True
        return x0, chosen


@dataclass(frozen=True)
class _DreamBlocks:
    """The block layout of one Dream request."""

    block_length: int
    steps_per_block: int
    timesteps: torch.Tensor  # [steps_per_block + 1] float32
    mask_id: int

    def scheduled_count(self, num_masked: int, step: int) -> int:
        """Positions committed at step >= 1: int(n * (1 - s / t)) in float32 (Dream's
        arithmetic), all that remain at the block's last step."""
        if step == self.steps_per_block - 1:
            return num_masked
        t, s = self.timesteps[step], self.timesteps[step + 1]
        return int(torch.tensor(num_masked, dtype=torch.float32) * (1 - s / t))


def _dream_block(
    model: Any,
    x: torch.Tensor,
    start: int,
    forward: _BlockForward,
    blocks: _DreamBlocks,
    rule: _DreamRule,
) -> list[int]:
    """Decode the block at [start, start + block_length) of x in place. -> commits per step."""
    end, commits = start + blocks.block_length, []
    parallel = rule.parallel.enabled
    for step in range(blocks.block_length if parallel else blocks.steps_per_block):
        positions = _masked_positions(x, start, end, blocks.mask_id)
        if positions.numel() == 0:
            break
        hidden, offset = forward(x, start, end, refresh=step == 0)
        if step == 0:
            # The block's first step commits its first position only.
            positions = positions.new_tensor([start])
        logits = model.compute_logits(hidden[_dream_rows(positions, offset)]).float()  # [n, V]
        if step == 0:
            x0, chosen = rule.sample(logits)[1], torch.ones_like(positions, dtype=torch.bool)
        elif parallel:
            confidence, x0 = rule.sample(logits)
            chosen = rule.parallel.select(confidence)
        else:
            x0, chosen = rule.select_scheduled(
                logits, blocks.scheduled_count(positions.numel(), step)
            )
        x[0, positions[chosen]] = x0[chosen]
        commits.append(int(chosen.sum()))
    return commits


def _validate_dream_block(
    input_ids: torch.Tensor,
    max_new_tokens: int,
    steps: int,
    block_length: int,
    cache: str,
    rule: _DreamRule,
) -> None:
    _require(input_ids.shape[0] == 1, f"batch size must be 1, got {input_ids.shape[0]}")
    _require(cache in CACHE_MODES, f"unknown cache {cache!r}; expected one of {CACHE_MODES}")
    _require(block_length > 0, f"block_length must be positive, got {block_length}")
    _require(
        max_new_tokens % block_length == 0,
        f"max_new_tokens {max_new_tokens} is not a multiple of block_length {block_length}",
    )
    num_blocks = max_new_tokens // block_length
    _require(
        steps % num_blocks == 0,
        f"steps {steps} is not a multiple of the number of blocks {num_blocks}",
    )
    _require(
        rule.parallel.enabled or steps // num_blocks >= 2,
        f"steps {steps} give {steps // num_blocks} steps per block; the block schedule needs >= 2",
    )


@torch.no_grad()
def dream_generate_block(
    model: Any,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    steps: int,
    block_length: int,
    mask_id: int,
    cache: str = "none",
    threshold: float | None = None,
    factor: float | None = None,
    alg: str = "entropy",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """Dream's blockwise loop (Fast-dLLM `generation_utils_block._sample`). input_ids: [1, P].

    cache in {"none", "prefix", "dual"}. Per block: step 0 (the refresh in the cached modes)
    commits the block's first position only, from the row before it; later steps commit by
    threshold, factor, or the block schedule linspace(1, eps, steps_per_block + 1) scored by
    `alg`. Logits are shifted as Dream's. -> DecodeResult(x [1, P + max_new_tokens], nfe,
    commits).
    """
    _validate_dream(input_ids, max_new_tokens, steps, eps, alg, alg_temp, temperature, top_p, top_k)
    rule = _DreamRule(
        _Parallel(threshold, factor), alg, alg_temp, temperature, top_p, top_k, generator
    )
    _validate_dream_block(input_ids, max_new_tokens, steps, block_length, cache, rule)
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
    steps_per_block = steps // (max_new_tokens // block_length)
    timesteps = torch.linspace(1, eps, steps_per_block + 1, device=x.device)
    blocks = _DreamBlocks(block_length, steps_per_block, timesteps, mask_id)
    forward, commits = _BlockForward(model, cache), []
    for start in range(input_ids.shape[1], x.shape[1], block_length):
        commits += _dream_block(model, x, start, forward, blocks, rule)
    return DecodeResult(x, forward.nfe, commits)
