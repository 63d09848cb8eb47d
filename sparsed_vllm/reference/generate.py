"""Reference LLaDA and Dream generation: the oracle the vLLM path is tested against.

Both are literal transcriptions of the published samplers (LLaDA's `generate.py`, Dream's
`diffusion_generate`), including their float arithmetic, so token-for-token comparisons hold.
Every random draw takes the optional `generator`; without it torch's global RNG is used, as the
originals do. `model` is any callable mapping input_ids [B, L] to logits [B, L, V] (or to an
object with `.logits`): the reference models here, or a Hugging Face model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _logits(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] from a model returning a tensor or an output with `.logits`."""
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _require(condition: bool, message: str) -> None:
    """Raise ValueError(message) for bad user-supplied generation arguments."""
    if not condition:
        raise ValueError(message)


# LLaDA


def add_gumbel_noise(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LLaDA's Gumbel-max in float64: exp(logits) / (-log U)**temperature; 0 -> logits as is."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step of a block. mask_index: [B, block_length] -> [B, steps].

    m masked positions over s steps: m // s each, one more for the first m % s steps.
    """
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = (
        torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    )
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


def _validate_llada(
    prompt: torch.Tensor,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float,
    cfg_scale: float,
    remasking: str,
) -> None:
    _require(prompt.dim() == 2, f"prompt must be [B, P], got shape {tuple(prompt.shape)}")
    _require(steps > 0, f"steps must be positive, got {steps}")
    _require(gen_length > 0, f"gen_length must be positive, got {gen_length}")
    _require(block_length > 0, f"block_length must be positive, got {block_length}")
    _require(
        gen_length % block_length == 0,
        f"gen_length {gen_length} is not a multiple of block_length {block_length}",
    )
    num_blocks = gen_length // block_length
    _require(
        steps % num_blocks == 0,
        f"steps {steps} is not a multiple of the number of blocks {num_blocks}",
    )
    _require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
    _require(cfg_scale >= 0, f"cfg_scale must be >= 0, got {cfg_scale}")
    _require(
        remasking in LLADA_REMASKING,
        f"unknown remasking {remasking!r}; expected one of {LLADA_REMASKING}",
    )


def _llada_step_logits(
    model: Callable, x: torch.Tensor, prompt_index: torch.Tensor, cfg_scale: float, mask_id: int
) -> torch.Tensor:
    """One forward over the canvas; with CFG also over x with the prompt masked. -> [B, L, V]."""
    if cfg_scale > 0.0:
        un_x = x.clone()
        un_x[prompt_index] = mask_id
        x_ = torch.cat([x, un_x], dim=0)
        logits = _logits(model, x_)
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        return un_logits + (cfg_scale + 1) * (logits - un_logits)
    return _logits(model, x)


@torch.no_grad()
def llada_generate(
    model: Callable,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LLaDA semi-autoregressive masked diffusion. prompt: [B, P] -> [B, P + gen_length].

    The canvas is split into gen_length / block_length blocks, decoded left to right with
    steps / num_blocks steps each; each step commits the `get_num_transfer_tokens` most confident
    masked positions of the current block (positions after it score -inf).
    """
    _validate_llada(prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking)
    p_len = prompt.shape[1]
    x = torch.full(
        (prompt.shape[0], p_len + gen_length), mask_id, dtype=torch.long, device=prompt.device
    )
    x[:, :p_len] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for num_block in range(num_blocks):
        block_start = p_len + num_block * block_length
        block_end = block_start + block_length
        block_mask_index = x[:, block_start:block_end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = _llada_step_logits(model, x, prompt_index, cfg_scale, mask_id)
            logits_with_noise = add_gumbel_noise(logits, temperature, generator)
            x0 = torch.argmax(logits_with_noise, dim=-1)  # [B, L]
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = torch.rand(x0.shape, device=x0.device, generator=generator)
            # Nothing after the current block may be committed yet.
            x0_p[:, block_end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# Dream


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set whose cumulative prob exceeds top_p (top-1 always). [N, V]."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    # Shift right: the token that crosses top_p stays, and so does the top-1.
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep logits >= the k-th largest (ties at the k-th all stay). [N, V]."""
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's sampler. logits: [N, V] -> (confidence [N], x0 [N]).

    Confidence is the chosen token's prob, or top1 - top2 (margin), or the negative entropy,
    always of the temperature-scaled, top_p/top_k-filtered distribution.
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0 and probs.shape[0] > 0:
        # What torch.distributions.Categorical(probs).sample() does (the published code's call).
        normalized = probs / probs.sum(-1, keepdim=True)
        x0 = torch.multinomial(normalized, 1, True, generator=generator).squeeze(-1)
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        epsilon = 1e-10
        log_probs = torch.log(probs + epsilon)
        confidence = torch.sum(probs * log_probs, dim=-1)
    return confidence, x0


def _validate_dream(
    input_ids: torch.Tensor,
    max_new_tokens: int,
    steps: int,
    eps: float,
    alg: str,
    alg_temp: float | None,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
) -> None:
    _require(input_ids.dim() == 2, f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
    _require(max_new_tokens > 0, f"max_new_tokens must be positive, got {max_new_tokens}")
    _require(steps > 0, f"steps must be positive, got {steps}")
    _require(0 <= eps < 1, f"eps must be in [0, 1), got {eps}")
    _require(alg in DREAM_ALGS, f"unknown alg {alg!r}; expected one of {DREAM_ALGS}")
    _require(alg_temp is None or alg_temp >= 0, f"alg_temp must be >= 0, got {alg_temp}")
    _require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
    _require(top_p is None or 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    _require(top_k is None or top_k >= 1, f"top_k must be >= 1, got {top_k}")


def _dream_origin_step(
    x: torch.Tensor,
    mask_index: torch.Tensor,
    mask_logits: torch.Tensor,
    p_transfer: float,
    sample: Callable,
    mask_id: int,
    generator: torch.Generator | None,
) -> None:
    """`origin`: each masked position is revealed with probability p_transfer (in place)."""
    x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_id
    transfer_index_t_s = torch.rand(*x0.shape, device=x.device, generator=generator) < p_transfer
    _, x0[transfer_index_t_s] = sample(mask_logits[transfer_index_t_s])
    x[mask_index] = x0.clone()


def _dream_confidence_step(
    x: torch.Tensor,
    mask_index: torch.Tensor,
    confidence: torch.Tensor,
    x0: torch.Tensor,
    number_transfer_tokens: int,
    alg_temp: float | None,
    mask_id: int,
    generator: torch.Generator | None,
) -> None:
    """Reveal the number_transfer_tokens most confident masked positions (in place)."""
    full_confidence = torch.full_like(x, -torch.inf, dtype=confidence.dtype)
    full_confidence[mask_index] = confidence
    if number_transfer_tokens <= 0:
        return
    if alg_temp is None or alg_temp == 0:
        _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
    else:
        full_confidence = F.softmax(full_confidence / alg_temp, dim=-1)
        transfer_index = torch.multinomial(
            full_confidence, num_samples=number_transfer_tokens, generator=generator
        )
    x_ = torch.zeros_like(x, dtype=torch.long) + mask_id
    x_[mask_index] = x0.clone()
    row_indices = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
    x[row_indices, transfer_index] = x_[row_indices, transfer_index]


@torch.no_grad()
def dream_generate(
    model: Callable,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    steps: int = 512,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dream `diffusion_generate`. input_ids: [B, P] -> [B, P + max_new_tokens].

    Timesteps linspace(1, eps, steps + 1) in float32; step i goes from t to s. `origin` reveals
    each masked position with prob 1 - s/t; the confidence algs reveal the
    int(num_mask * (1 - s/t)) most confident ones; the last step reveals all that remain.
    """
    _validate_dream(input_ids, max_new_tokens, steps, eps, alg, alg_temp, temperature, top_p, top_k)
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)

    def sample(rows: torch.Tensor, **flags: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_tokens(rows, temperature, top_p, top_k, generator=generator, **flags)

    for i in range(steps):
        mask_index = x == mask_id
        logits = _logits(model, x)
        # Dream predicts token i from the hidden state at i - 1.
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            _dream_origin_step(x, mask_index, mask_logits, p_transfer, sample, mask_id, generator)
            continue
        confidence, x0 = sample(
            mask_logits, margin_confidence=alg == "topk_margin", neg_entropy=alg == "entropy"
        )
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        number_transfer_tokens = (
            int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        )
        _dream_confidence_step(
            x, mask_index, confidence, x0, number_transfer_tokens, alg_temp, mask_id, generator
        )
    return x
