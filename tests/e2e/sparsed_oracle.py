"""A straightforward SparseD for the reference models, written from the algorithm's statement.

It is independent of `sparsed_vllm.core.pattern` and the kernels on purpose: the engine's
tokens are compared with the reference generate loops running this attention.
"""

import math

import torch


def select_keep(q, k, gen_length: int, block_size: int, select: float, scale: float):
    """Kept tiles per head. q, k: [H, L, D] (k already expanded per query head) -> [H, nb, nb]"""
    heads, length, _ = q.shape
    nb = math.ceil(length / block_size)
    g = next((t for t in range(nb) if length - t * block_size <= gen_length), nb - 1)

    def top(n_candidates: int) -> int:
        return min(n_candidates, max(1, int(n_candidates * select) + 1))

    keep = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        for i in range(nb):
            rows = q[h, i * block_size : (i + 1) * block_size].float()
            probs = torch.softmax(rows @ k[h].float().T * scale, dim=-1)
            mass = torch.stack(
                [probs[:, j * block_size : (j + 1) * block_size].sum() for j in range(nb)]
            ) / (block_size * block_size)
            for j in torch.topk(mass, top(nb)).indices.tolist():
                keep[h, i, j] = j < g
            gen_probs = torch.softmax(rows @ k[h, g * block_size :].float().T * scale, dim=-1)
            gen_mass = torch.stack(
                [gen_probs[:, j * block_size : (j + 1) * block_size].sum() for j in range(nb - g)]
            ) / (block_size * block_size)
            for j in torch.topk(gen_mass, top(nb - g)).indices.tolist():
                keep[h, i, g + j] = True
    return keep


def masked_attention(q, k, v, keep, block_size: int):
    """Softmax over kept key tiles only. q, k, v: [H, L, D], keep: [H, nb, nb] -> [H, L, D]"""
    length = q.shape[1]
    token_keep = keep.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    token_keep = token_keep[:, :length, :length]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~token_keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class SparsedOracle:
    """Attention function for the reference models: dense before the switch step, selection at
    it, block-sparse after it. Layers call it in order once per forward; one forward per step."""

    def __init__(self, num_layers, total_steps, gen_length, skip, select, block_size, scale=None):
        self.num_layers = num_layers
        self.total_steps = total_steps
        self.switch = int(total_steps * skip) + 1
        self.gen_length, self.select, self.block_size = gen_length, select, block_size
        self.scale = scale
        self.calls = 0
        self.keep: dict[int, torch.Tensor] = {}
        self.stages: list[str] = []

    def __call__(self, q, k, v):
        step, layer = divmod(self.calls, self.num_layers)
        self.calls += 1
        q0, k0, v0 = q[0], k[0], v[0]  # batch of one
        if self.switch < self.total_steps and step > self.switch:
            stage = "sparse"
            out = masked_attention(q0, k0, v0, self.keep[layer], self.block_size)
        else:
            stage = "select" if step == self.switch < self.total_steps else "dense"
            out = torch.softmax(q0 @ k0.transpose(-1, -2) / math.sqrt(q0.shape[-1]), -1) @ v0
            if stage == "select":
                scale = self.scale or 1 / math.sqrt(q0.shape[-1])
                self.keep[layer] = select_keep(
                    q0, k0, self.gen_length, self.block_size, self.select, scale
                )
        if layer == 0:
            self.stages.append(stage)
        return out[None]


def llada_oracle_generate(model, mask_id: int, prompt: list[int], scale: float | None = None):
    """The reference LLaDA loop with this SparseD: 32 tokens, 32 steps, blocks of 8, skip 0.2,
    select 0.3, tiles of 16. Returns (generated tokens, the oracle that ran)."""
    from sparsed_vllm.reference.generate import llada_generate

    oracle = SparsedOracle(model.config.num_hidden_layers, 32, 32, 0.2, 0.3, 16, scale=scale)
    model.attn_fn, default = oracle, model.attn_fn
    try:
        out = llada_generate(
            model, torch.tensor([prompt]), steps=32, gen_length=32, block_length=8, mask_id=mask_id
        )
    finally:
        model.attn_fn = default
    return out[0, len(prompt) :].tolist(), oracle


def _token_keep(keep: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """[H, nb, nb] tiles -> [H, L, L] token pairs."""
    tokens = keep.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return tokens[:, :length, :length]


@torch.no_grad()
def llada_cached_sparsed(
    model, mask_id: int, prompt: list[int], gen: int, extra: dict, scale: float | None = None
):
    """Greedy LLaDA with a cache (and threshold/factor) and SparseD, step by step: the patterns
    are selected at the first full forward at or after step int(steps * skip) + 1, from its Q
    and K; refreshes after it are block-sparse, and each cached window row attends to the kept
    key tiles of its query tile. `scale` scores the selection (default 1/sqrt(head_dim)).
    -> (generated tokens, stages of the steps)."""
    import torch.nn.functional as F

    from sparsed_vllm.reference.cached import select_factor, select_threshold, select_top_k
    from sparsed_vllm.reference.generate import get_num_transfer_tokens

    cache, steps, block = extra["cache"], extra["steps"], extra["block_length"]
    threshold, factor = extra.get("threshold"), extra.get("factor")
    skip, select, tile = extra["sparsed_skip"], extra["sparsed_select"], extra["sparsed_block_size"]
    x = torch.tensor([prompt + [mask_id] * gen])
    length, layers = x.shape[1], model.config.num_hidden_layers
    switch, spb = int(steps * skip) + 1, steps // (gen // block)
    keep: dict[int, torch.Tensor] = {}
    stages, step = [], 0

    def full_attention(layer: int, stage: str):
        def attend(q, k, v):
            q0, k0, v0 = q[0], k[0], v[0]
            if stage == "sparse":
                return masked_attention(q0, k0, v0, keep[layer], tile)[None]
            if stage == "select":
                score_scale = scale or 1 / math.sqrt(q0.shape[-1])
                keep[layer] = select_keep(q0, k0, gen, tile, select, score_scale)
            scores = q0 @ k0.transpose(-1, -2) / math.sqrt(q0.shape[-1])
            return (torch.softmax(scores, -1) @ v0)[None]

        return attend

    for start in range(len(prompt), length, block):
        end = start + block
        schedule = get_num_transfer_tokens(x[:, start:end] == mask_id, spb)[0]
        kv = None
        parallel = threshold is not None or factor is not None
        for i in range(block if parallel else spb):
            positions = (x[0, start:end] == mask_id).nonzero().flatten() + start
            if positions.numel() == 0:
                break
            full = cache == "none" or i == 0
            stage = "sparse" if keep else ("select" if full and step >= switch < steps else "dense")
            if full:
                fns = [full_attention(layer, stage) for layer in range(layers)]
                if cache == "none":
                    hidden = model.forward_hidden(x, attn_fn=fns)
                else:
                    hidden, kv = model.forward_with_kv(x, attn_fn=fns)
                rows = hidden[0, positions]
            else:
                stop = length if cache == "prefix" else end
                masks = None
                if stage == "sparse":
                    masks = [
                        _token_keep(keep[i_layer], tile, length)[:, start:stop]
                        for i_layer in range(layers)
                    ]
                hidden = model.forward_window(x[:, start:stop], start, kv, masks)
                rows = hidden[0, positions - start]
            logits = model.compute_logits(rows).float()
            x0 = logits.argmax(-1)
            if parallel:
                confidence = F.softmax(logits.double(), -1).gather(-1, x0[:, None]).squeeze(-1)
                rule = select_threshold if threshold is not None else select_factor
                chosen = rule(confidence, threshold if threshold is not None else factor)
            else:
                confidence = F.softmax(logits, -1).gather(-1, x0[:, None]).squeeze(-1)
                chosen = select_top_k(confidence, int(schedule[i]))
            x[0, positions[chosen]] = x0[chosen]
            stages.append(stage)
            step += 1
    return x[0, len(prompt) :].tolist(), stages
