"""The per-request state machine the model runner drives, against the reference generate loops.

Driving `DiffusionRequest` with the plain PyTorch model must reproduce `llada_generate` /
`dream_generate` token for token (greedy), emit each block exactly once when it is committed, and
never change a committed token.
"""

import json

import pytest
import torch

from sparsed_vllm.core.params import DREAM, LLADA, resolve_params
from sparsed_vllm.core.request import DiffusionRequest
from sparsed_vllm.reference.generate import dream_generate, llada_generate

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], list(range(20, 51))]


def mask_id(ckpt_dir) -> int:
    return json.loads((ckpt_dir / "config.json").read_text())["mask_token_id"]


def drive(model, request: DiffusionRequest) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """Run a request to the end with the reference model; returns (canvas tail, emissions)."""
    emitted = []
    while not request.finished:
        rows = request.logit_positions()
        logits = torch.stack([model(seq[None])[0, rows] for seq in request.sequences()])
        tokens = request.advance(logits)
        if tokens:
            emitted.append((request.step, tokens))
    return request.canvas[request.prompt_len :].tolist(), emitted


@pytest.mark.parametrize("prompt", PROMPTS, ids=["P7", "P3", "P31"])
@pytest.mark.parametrize(
    "case",
    [
        dict(steps=16, block_length=16),
        dict(steps=16, block_length=8),
        dict(steps=8, block_length=4),
        dict(steps=16, block_length=4, cfg_scale=1.5),
        dict(steps=5, block_length=16),
        dict(steps=16, block_length=4),
    ],
    ids=["one-block", "B8", "B4", "B4-cfg", "uneven-split", "one-token-per-step"],
)
def test_llada_matches_reference(llada_tiny, llada_tiny_dir, prompt, case):
    mask = mask_id(llada_tiny_dir)
    params = resolve_params(LLADA, case, max_tokens=16)
    canvas, emitted = drive(llada_tiny, DiffusionRequest(prompt, params, mask))
    ref = llada_generate(llada_tiny, torch.tensor([prompt]), gen_length=16, mask_id=mask, **case)
    assert canvas == ref[0, len(prompt) :].tolist()
    # Each block is emitted once, at its last step, in order, and concatenates to the answer.
    block, spb = params.block_length, params.steps_per_block
    assert [step for step, _ in emitted] == [spb * (i + 1) for i in range(params.num_blocks)]
    assert [t for _, tokens in emitted for t in tokens] == canvas
    assert all(len(tokens) == block for _, tokens in emitted)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["P7", "P3", "P31"])
@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [16, 7])
def test_dream_matches_reference(dream_tiny, dream_tiny_dir, prompt, alg, steps):
    mask = mask_id(dream_tiny_dir)
    params = resolve_params(DREAM, {"alg": alg, "steps": steps}, max_tokens=16)
    canvas, emitted = drive(dream_tiny, DiffusionRequest(prompt, params, mask))
    ref = dream_generate(
        dream_tiny, torch.tensor([prompt]), max_new_tokens=16, steps=steps, alg=alg, mask_id=mask
    )
    assert canvas == ref[0, len(prompt) :].tolist()
    assert emitted == [(steps, canvas)]


def test_committed_tokens_never_change(llada_tiny, llada_tiny_dir):
    mask = mask_id(llada_tiny_dir)
    params = resolve_params(
        LLADA, {"steps": 8, "block_length": 4}, max_tokens=8, temperature=1.0, seed=3
    )
    request = DiffusionRequest([1, 2, 3], params, mask)
    seen = request.canvas.clone()
    while not request.finished:
        rows = request.logit_positions()
        request.advance(torch.stack([llada_tiny(request.canvas[None])[0, rows]]))
        committed = seen != mask
        assert torch.equal(request.canvas[committed], seen[committed])
        # Exactly the scheduled number of tokens was committed this step.
        assert int((request.canvas != mask).sum() - committed.sum()) == 1
        seen = request.canvas.clone()


def test_seed_reproducible_and_independent(dream_tiny, dream_tiny_dir):
    mask = mask_id(dream_tiny_dir)

    def sample(seed):
        params = resolve_params(
            DREAM, {"alg": "entropy", "steps": 8}, max_tokens=16, temperature=5.0, seed=seed
        )
        return drive(dream_tiny, DiffusionRequest([4, 5, 6], params, mask))[0]

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_empty_prompt_is_rejected():
    params = resolve_params(LLADA, None, max_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        DiffusionRequest([], params, 99)


def test_summary_counts_committed_tokens_per_step(llada_tiny, llada_tiny_dir):
    """A request stopped after its first block (end of text there) reports the tokens it
    committed per step, not the canvas length over the steps."""
    mask = mask_id(llada_tiny_dir)
    params = resolve_params(
        LLADA, {"steps": 16, "block_length": 8, "threshold": 1e-9}, max_tokens=16
    )
    request = DiffusionRequest([5, 6, 7], params, mask)
    while not request.advance(
        torch.stack([llada_tiny(request.canvas[None])[0, request.logit_positions()]])
    ):
        pass
    assert request.summary()["tokens_per_step"] == 8 / request.step
    assert request.summary()["tokens_per_step"] > 1  # every max probability clears 1e-9
