"""Token proposal and commit rules of LLaDA and Dream, for one request's candidate rows.

Each function sees only the rows that can change this step (masked positions of the current block
for LLaDA, all masked positions for Dream), so the model computes logits only there. The rules are
those of LLaDA's `generate` and Dream's `diffusion_generate`; all randomness comes from the
request's own `torch.Generator`, so every tensor-parallel rank draws the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def llada_num_transfer(num_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: an even split, remainder to the first steps."""
    base, remainder = divmod(num_masked, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def _rand(shape: tuple[int, ...], generator: torch.Generator, dtype=torch.float32, device=None):
    # Drawn where the generator lives (CPU) and then moved: the same seed gives the same numbers
    # on every rank and on every device.
    return torch.rand(shape, generator=generator, dtype=dtype).to(device)


def llada_propose(
    logits: torch.Tensor,
    temperature: float,
    remasking: str,
    generator: torch.Generator,
    float64: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposed tokens and their confidence. logits: [n, V] -> (x0 [n], confidence [n]).

    Gumbel-max in float64 with `exp(logits) / (-log U) ** temperature`; temperature 0 is argmax.
    The confidence is the softmax probability of x0 in the logits' dtype (LLaDA's schedule), or in
    float64 with `float64` (Fast-dLLM's threshold and factor rules).
    """
    if temperature == 0:
        x0 = logits.argmax(dim=-1)
    else:
        noise = _rand(tuple(logits.shape), generator, torch.float64, logits.device)
        gumbel = (-torch.log(noise)) ** temperature
        x0 = (logits.to(torch.float64).exp() / gumbel).argmax(dim=-1)
    if remasking == "low_confidence":
        probs = F.softmax(logits.to(torch.float64) if float64 else logits, dim=-1)
        confidence = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    elif remasking == "random":
        confidence = _rand((logits.shape[0],), generator, device=logits.device)
    else:
        raise ValueError(f"remasking must be low_confidence or random, got {remasking!r}")
    return x0, confidence


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """LLaDA classifier-free guidance: un + (cfg + 1) * (cond - un)."""
    return uncond + (cfg_scale + 1) * (cond - uncond)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set with cumulative probability > top_p (always the top-1). [n, V]"""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove_sorted = cumulative > top_p
    remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits per row. [n, V]"""
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_sample(
    logits: torch.Tensor,
    *,
    alg: str,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's sample_tokens. logits: [n, V] -> (confidence [n], x0 [n])."""
    if temperature > 0:
        logits = logits / temperature
    if top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
        confidence = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's noise levels t_0 = 1 > ... > t_steps = eps (float32, as its generate builds them)."""
    return torch.linspace(1, eps, steps + 1)


def dream_num_transfer(num_masked: int, step: int, steps: int, timesteps: torch.Tensor) -> int:
    """int(num_mask * (1 - s / t)) in float32 like the reference; everything left at the end."""
    if step == steps - 1:
        return num_masked
    t, s = timesteps[step], timesteps[step + 1]
    return int(torch.tensor(float(num_masked)) * (1 - s / t))


def parallel_select(
    confidence: torch.Tensor, threshold: float | None, factor: float | None
) -> torch.Tensor:
    """Fast-dLLM's parallel commit over one step's candidates. confidence: [n] -> indices [k].

    threshold: every candidate with confidence >= threshold, and always the most confident one.
    factor: sorted descending c_0 >= c_1 >= ..., the first j >= 1 with c_j < 1 - factor / (j + 2)
    gives j tokens (all n when no j fails), except that j = n - 1 also commits the last one (the
    published rule's boundary case).
    """
    if threshold is not None:
        chosen = confidence >= threshold
        chosen[torch.argmax(confidence)] = True
        return torch.nonzero(chosen).squeeze(-1).cpu()
    ordered = torch.sort(confidence, descending=True).values.tolist()
    n = len(ordered)
    failing = (j for j in range(1, n) if ordered[j] < 1 - factor / (j + 2))
    count = next(failing, n)
    if count == n - 1:
        count = n
    return torch.topk(confidence, count).indices.cpu()


def choose_positions(
    confidence: torch.Tensor, k: int, alg_temp: float, generator: torch.Generator
) -> torch.Tensor:
    """Indices of the k positions to reveal: the most confident, or drawn without replacement
    from softmax(confidence / alg_temp) when alg_temp > 0 (Dream). confidence: [n] -> [k] (CPU)

    Positions whose weight underflows to zero are never drawn; when fewer than k remain, the
    rest are taken in confidence order (the published sampler raises there).
    """
    if alg_temp <= 0:
        return torch.topk(confidence, k).indices.cpu()
    weights = torch.softmax(confidence / alg_temp, dim=-1).cpu()
    drawable = int((weights > 0).sum())
    if drawable >= k:
        return torch.multinomial(weights, k, generator=generator)
    drawn = torch.multinomial(weights, drawable, generator=generator)
    rest = confidence.cpu().clone()
    rest[drawn] = float("-inf")
    return torch.cat([drawn, torch.topk(rest, k - drawable).indices])
