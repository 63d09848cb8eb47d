"""One request's denoising state: the canvas, the step counter and the commit rules.

A step is: `sequences()` gives the token rows to run through the model, `logit_positions()` the
positions whose logits can change a token, and `advance(logits)` commits tokens and returns the
ones that became final (a whole semi-autoregressive block at once). The model runner drives many
of these side by side; the reference tests drive one with a plain PyTorch model.
"""

from __future__ import annotations

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
)


class DiffusionRequest:
    """Canvas = prompt + gen_length x [MASK]; one call of `advance` per denoising step."""

    def __init__(self, prompt_ids: list[int], params: DiffusionParams, mask_id: int):
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        self.params = params
        self.mask_id = mask_id
        self.prompt_len = len(prompt_ids)
        self.canvas = torch.tensor(
            list(prompt_ids) + [mask_id] * params.gen_length, dtype=torch.long
        )
        self.step = 0
        self.generator = torch.Generator().manual_seed(params.seed)
        self._block_transfer: list[int] = []
        if params.family != LLADA:
            self._timesteps = dream_timesteps(params.steps, params.eps)

    @property
    def seq_len(self) -> int:
        return self.canvas.numel()

    @property
    def finished(self) -> bool:
        return self.step >= self.params.steps

    @property
    def block(self) -> int:
        """Index of the semi-autoregressive block being denoised (always 0 for Dream)."""
        return min(self.step // self.params.steps_per_block, self.params.num_blocks - 1)

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
        """Canvas positions that may be committed this step (masked ones). [n]"""
        if self.params.family == LLADA:
            start, end = self._block_range()
            window = self.canvas[start:end]
            return torch.nonzero(window == self.mask_id).squeeze(-1) + start
        return torch.nonzero(self.canvas == self.mask_id).squeeze(-1)

    def logit_positions(self) -> torch.Tensor:
        """Hidden-state rows whose logits are needed. [n]

        Dream predicts position i from the hidden state at i - 1 (its logits are shifted), and
        position 0 from its own row, as the published shift `cat([logits[:1], logits[:-1]])`.
        """
        positions = self.candidate_positions()
        return positions if self.params.family == LLADA else (positions - 1).clamp(min=0)

    def advance(self, logits: torch.Tensor) -> list[int]:
        """Commit this step's tokens. logits: [num_sequences, n, V] at `logit_positions()`.

        Returns the tokens that became final this step (a finished block, or the whole canvas
        for Dream at its last step); an empty list otherwise.
        """
        if self.finished:
            raise RuntimeError("advance() called on a finished request")
        positions = self.candidate_positions()
        if self.params.family == LLADA:
            self._llada_step(positions, logits)
        else:
            self._dream_step(positions, logits[0])
        self.step += 1
        return self._emitted()

    def _emitted(self) -> list[int]:
        p = self.params
        if self.step % p.steps_per_block:
            return []
        block = (self.step - 1) // p.steps_per_block
        start = self.prompt_len + block * p.block_length
        return self.canvas[start : start + p.block_length].tolist()

    def _llada_step(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        p = self.params
        step_in_block = self.step % p.steps_per_block
        if step_in_block == 0:
            self._block_transfer = llada_num_transfer(positions.numel(), p.steps_per_block)
        k = self._block_transfer[step_in_block]
        if k == 0:
            return
        scores = logits[0] if p.cfg_scale <= 0 else cfg_logits(logits[0], logits[1], p.cfg_scale)
        x0, confidence = llada_propose(scores, p.temperature, p.remasking, self.generator)
        chosen = torch.topk(confidence, k).indices.cpu()
        self.canvas[positions[chosen]] = x0.cpu()[chosen]

    def _dream_step(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        p = self.params
        if positions.numel() == 0:
            return
        sample = dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        if p.alg == "origin":
            t, s = self._timesteps[self.step], self._timesteps[self.step + 1]
            p_transfer = 1 - s / t if self.step < p.steps - 1 else 1
            transfer = torch.rand(positions.numel(), generator=self.generator) < p_transfer
            if transfer.any():
                _, x0 = dream_sample(
                    logits[transfer.to(logits.device)],
                    alg="origin",
                    generator=self.generator,
                    **sample,
                )
                self.canvas[positions[transfer]] = x0.cpu()
            return
        confidence, x0 = dream_sample(logits, alg=p.alg, generator=self.generator, **sample)
        k = dream_num_transfer(positions.numel(), self.step, p.steps, self._timesteps)
        if k <= 0:
            return
        chosen = choose_positions(confidence, k, p.alg_temp, self.generator)
        self.canvas[positions[chosen]] = x0.cpu()[chosen]
