"""One request's decoding state: the canvas, the step counters, the plan of each step, the commits.

The one owner of everything per request that changes from step to step. A step is: `plan()` says
which positions run through the model, whether their keys and values go to (or come from) the
request's KV cache, which hidden rows need logits, and the SparseD stage; `advance(logits)`
applies the commit rule and returns the tokens that became final (a whole block at once). Every
tensor-parallel rank drives an identical copy with identical logits, so no step counter has to
travel between processes. The model runner drives many of these side by side; the reference
tests drive one with a plain PyTorch model.

Decoding modes (`DiffusionParams`): LLaDA's blocks and Dream's single canvas as published, and
Fast-dLLM's cached (`cache` prefix/dual) and parallel (`threshold`/`factor`) block loops, whose
rules are stated in sparsed_vllm/reference/CACHED.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsed_vllm.core.params import LLADA, DiffusionParams
from sparsed_vllm.core.sampling import (
    cfg_logits,
    choose_positions,
    dream_num_transfer,
    dream_sample,
    dream_timesteps,
    llada_num_transfer,
    llada_propose,
    parallel_select,
)
from sparsed_vllm.core.sparsed import DENSE, SELECT, SPARSE, SparsedSettings


@dataclass(frozen=True)
class StepPlan:
    """One request's share of one engine step.

    Positions [start, end) of each of its sequences run through the model. `cached`: their keys
    and values are first written to the request's KV cache, and their queries attend to all
    `seq_len` keys read from it (the rest as the block's refresh left them). Otherwise the step is
    a full forward (start 0, end seq_len) whose attention uses its own keys; `store_kv` keeps them
    in the cache for the block's later steps (a refresh).
    """

    start: int
    end: int
    seq_len: int
    cached: bool
    store_kv: bool
    logit_rows: torch.Tensor  # [n] positions whose hidden rows need logits (absolute)
    stage: str  # SparseD stage: dense | select | sparse
    num_sequences: int

    @property
    def num_tokens(self) -> int:
        """Tokens this step runs through the model (what the scheduler budgets)."""
        return (self.end - self.start) * self.num_sequences

    @property
    def runs_forward(self) -> bool:
        # Nothing to commit needs no forward, unless the step selects the SparseD patterns.
        return self.logit_rows.numel() > 0 or self.stage == SELECT


class DiffusionRequest:
    """Canvas = prompt + gen_length x [MASK]; one `plan()` + `advance()` per denoising step."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: DiffusionParams,
        mask_id: int,
        sparsed: SparsedSettings | None = None,
    ):
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        self.params = params
        self.mask_id = mask_id
        self.sparsed = sparsed
        self.prompt_len = len(prompt_ids)
        self.canvas = torch.tensor(
            list(prompt_ids) + [mask_id] * params.gen_length, dtype=torch.long
        )
        self.step = 0  # steps taken, all blocks together
        self.block = 0  # the block being denoised
        self.block_step = 0  # steps taken in it
        self.generator = torch.Generator().manual_seed(params.seed)
        self.stage_counts = dict.fromkeys((DENSE, SELECT, SPARSE), 0)
        self.selected = False  # SparseD patterns chosen (from then on every step is sparse)
        self.commits: list[int] = []  # tokens committed by each step
        self._block_transfer: list[int] = []
        if params.family != LLADA:
            # Dream's noise levels: over the whole canvas, or over each block's steps.
            steps = params.steps_per_block if params.blockwise_dream else params.steps
            self._timesteps = dream_timesteps(steps, params.eps)

    @property
    def seq_len(self) -> int:
        return self.canvas.numel()

    @property
    def finished(self) -> bool:
        return self.block >= self.params.num_blocks

    def _block_range(self) -> tuple[int, int]:
        start = self.prompt_len + self.block * self.params.block_length
        return start, start + self.params.block_length

    def sequences(self) -> list[torch.Tensor]:
        """Token rows for this step: the canvas, plus the prompt-masked copy under CFG. [L] each"""
        if self.params.cfg_scale <= 0:
            return [self.canvas]
        uncond = self.canvas.clone()
        uncond[: self.prompt_len] = self.mask_id
        return [self.canvas, uncond]

    def candidate_positions(self) -> torch.Tensor:
        """Canvas positions that may be committed this step. [n]

        LLaDA and Dream's blockwise modes: the masked positions of the current block (only its
        first position at a blockwise Dream block's first step); Dream's published decoding: every
        masked position.
        """
        p = self.params
        if p.family != LLADA and not p.blockwise_dream:
            return torch.nonzero(self.canvas == self.mask_id).squeeze(-1)
        start, end = self._block_range()
        if p.blockwise_dream and self.block_step == 0:
            return torch.tensor([start])
        return torch.nonzero(self.canvas[start:end] == self.mask_id).squeeze(-1) + start

    @property
    def full_step(self) -> bool:
        """Whether this step runs the whole sequence: always without a cache, and at the first
        step of each block (its refresh) with one."""
        return self.params.cache == "none" or self.block_step == 0

    def logit_positions(self) -> torch.Tensor:
        """Hidden rows (absolute positions) whose logits this step needs. [n]"""
        return self.plan().logit_rows

    def stage(self) -> str:
        """SparseD stage of this step.

        Selection needs a full forward's Q and K: it happens at the first full forward at or
        after global step `switch = int(steps * skip) + 1` (with `steps` the request's step budget,
        also when threshold/factor make the actual count data dependent). Every step is a full
        forward without a cache, so that is step `switch` itself, as in the paper; with a cache
        it is the first block refresh from `switch` on. Steps before it are dense, every step
        after it (refreshes and cached steps alike) is sparse. A request that finishes first
        never goes sparse.
        """
        settings, steps = self.sparsed, self.params.steps
        if settings is None or not settings.goes_sparse(steps):
            return DENSE
        if self.selected:
            return SPARSE
        return SELECT if self.full_step and self.step >= settings.switch_step(steps) else DENSE

    def plan(self) -> StepPlan:
        """What this step runs. Cached modes: a block's first step is a full forward that
        refreshes the cache; its later steps run the block (dual) or the block and everything
        after it (prefix)."""
        p, full = self.params, self.full_step
        start, end = self._run_range()
        positions = self.candidate_positions()
        # Dream predicts position i from hidden row i - 1; the first row run reads its own.
        rows = positions if p.family == LLADA else (positions - 1).clamp(min=start)
        return StepPlan(
            start=start,
            end=end,
            seq_len=self.seq_len,
            cached=not full,
            store_kv=p.cache != "none",
            logit_rows=rows,
            stage=self.stage(),
            num_sequences=p.num_sequences,
        )

    def _run_range(self) -> tuple[int, int]:
        """Positions [start, end) this step runs through the model."""
        if self.full_step:
            return 0, self.seq_len
        start, end = self._block_range()
        return start, self.seq_len if self.params.cache == "prefix" else end

    @property
    def step_tokens(self) -> int:
        """Tokens this step runs (`plan().num_tokens`, without planning the step)."""
        start, end = self._run_range()
        return (end - start) * self.params.num_sequences

    def summary(self) -> dict:
        """Steps taken, tokens per step and SparseD stage counts (for logs and metrics)."""
        p = self.params
        return {
            "steps": self.step,
            "tokens_per_step": sum(self.commits) / max(self.step, 1),
            "cache": p.cache,
            "threshold": p.threshold,
            "factor": p.factor,
            "stages": dict(self.stage_counts),
        }

    def advance(self, logits: torch.Tensor) -> list[int]:
        """Commit this step's tokens. logits: [num_sequences, n, V] at the plan's `logit_rows`.

        Returns the tokens that became final this step (a finished block, or the whole canvas
        for Dream's published decoding at its last step); an empty list otherwise.
        """
        if self.finished:
            raise RuntimeError("advance() called on a finished request")
        positions = self.candidate_positions()
        if self.params.family == LLADA:
            committed = self._llada_step(positions, logits)
        elif self.params.blockwise_dream:
            committed = self._dream_block_step(positions, logits[0])
        else:
            committed = self._dream_step(positions, logits[0])
        stage = self.stage()
        self.stage_counts[stage] += 1
        self.selected = self.selected or stage == SELECT
        self.commits.append(committed)
        self.step += 1
        self.block_step += 1
        if not self._block_done():
            return []
        start, end = self._block_range()
        self.block += 1
        self.block_step = 0
        return self.canvas[start:end].tolist()

    def _block_done(self) -> bool:
        p = self.params
        if p.family != LLADA and not p.blockwise_dream:
            return self.block_step == p.steps  # Dream's canvas runs all its noise levels
        # A block ends when it has no [MASK] left, or after its scheduled steps; parallel rules
        # commit at least one token per step, so block_length steps bound them (a proposal may be
        # the [MASK] token itself).
        start, end = self._block_range()
        masked = bool((self.canvas[start:end] == self.mask_id).any())
        limit = p.block_length if p.parallel else p.steps_per_block
        return not masked or self.block_step == limit

    def _llada_step(self, positions: torch.Tensor, logits: torch.Tensor) -> int:
        p = self.params
        scores = logits[0] if p.cfg_scale <= 0 else cfg_logits(logits[0], logits[1], p.cfg_scale)
        if p.parallel:
            x0, confidence = llada_propose(
                scores, p.temperature, p.remasking, self.generator, float64=True
            )
            chosen = parallel_select(confidence, p.threshold, p.factor)
        else:
            if self.block_step == 0:
                self._block_transfer = llada_num_transfer(positions.numel(), p.steps_per_block)
            k = self._block_transfer[self.block_step]
            if k == 0:
                return 0
            x0, confidence = llada_propose(scores, p.temperature, p.remasking, self.generator)
            chosen = torch.topk(confidence, k).indices.cpu()
        self.canvas[positions[chosen]] = x0.cpu()[chosen]
        return chosen.numel()

    def _sample(self, logits: torch.Tensor, alg: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        return dream_sample(
            logits,
            alg=alg,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            generator=self.generator,
        )

    def _dream_step(self, positions: torch.Tensor, logits: torch.Tensor) -> int:
        """Dream's published decoding: one canvas, `steps` noise levels."""
        p = self.params
        if positions.numel() == 0:
            return 0
        if p.alg == "origin":
            t, s = self._timesteps[self.step], self._timesteps[self.step + 1]
            p_transfer = 1 - s / t if self.step < p.steps - 1 else 1
            transfer = torch.rand(positions.numel(), generator=self.generator) < p_transfer
            if transfer.any():
                _, x0 = self._sample(logits[transfer.to(logits.device)], "origin")
                self.canvas[positions[transfer]] = x0.cpu()
            return int(transfer.sum())
        confidence, x0 = self._sample(logits, p.alg)
        k = dream_num_transfer(positions.numel(), self.step, p.steps, self._timesteps)
        if k <= 0:
            return 0
        chosen = choose_positions(confidence, k, p.alg_temp, self.generator)
        self.canvas[positions[chosen]] = x0.cpu()[chosen]
        return k

    def _dream_block_step(self, positions: torch.Tensor, logits: torch.Tensor) -> int:
        """Fast-dLLM's blockwise Dream: a block's first step commits its first position; later
        steps commit by threshold/factor, or by the block's own noise levels scored by `alg`
        (origin, which has no score, by negative entropy as Fast-dLLM's loop does)."""
        p = self.params
        if positions.numel() == 0:
            return 0
        if self.block_step == 0:
            chosen = torch.tensor([0])
            x0 = self._sample(logits, "maskgit_plus")[1]
        elif p.parallel:
            confidence, x0 = self._sample(logits, "maskgit_plus")
            chosen = parallel_select(confidence, p.threshold, p.factor)
        else:
            alg = "entropy" if p.alg == "origin" else p.alg
            confidence, x0 = self._sample(logits, alg)
            n = positions.numel()
            k = dream_num_transfer(n, self.block_step, p.steps_per_block, self._timesteps)
            if k <= 0:
                return 0
            chosen = choose_positions(confidence, k, p.alg_temp, self.generator)
        self.canvas[positions[chosen]] = x0.cpu()[chosen]
        return chosen.numel()
