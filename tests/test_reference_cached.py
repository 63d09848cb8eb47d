"""Cached and parallel reference decoding: the window forward, the commit rules, the block loops."""

import itertools

import pytest
import torch

from sparsed_vllm.checkpoint import write_checkpoint
from sparsed_vllm.reference.cached import (
    CACHE_MODES,
    dream_generate_block,
    factor_transfer_count,
    llada_generate_fast,
    llada_generate_with_dual_cache,
    llada_generate_with_prefix_cache,
    llada_proposals,
    select_factor,
    select_threshold,
)
from sparsed_vllm.reference.generate import llada_generate
from sparsed_vllm.reference.models import LLaDAModel, apply_rope, rope_cos_sin

pytestmark = pytest.mark.usefixtures("single_thread")

LLADA_MASK, DREAM_MASK = 1020, 1023
LLADA_LOOPS = {
    "none": llada_generate_fast,
    "prefix": llada_generate_with_prefix_cache,
    "dual": llada_generate_with_dual_cache,
}
RULES = {"schedule": {}, "threshold": {"threshold": 0.9}, "factor": {"factor": 1.0}}


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not a.isnan().any()
    return ((a - b).norm() / b.norm()).item()


class CallLog:
    """Wraps a reference model; keeps the kind of every forward and the canvas x it saw.

    A window's canvas is the previous canvas with the window's tokens spliced in: within a block
    nothing outside the window can have changed.
    """

    def __init__(self, model):
        self.model, self.kinds, self.canvases, self.windows = model, [], [], []

    def _record(self, kind, canvas, window=None):
        self.kinds.append(kind)
        self.canvases.append(canvas.clone())
        self.windows.append(window)

    def forward_hidden(self, x):
        self._record("full", x)
        return self.model.forward_hidden(x)

    def forward_with_kv(self, x):
        self._record("refresh", x)
        return self.model.forward_with_kv(x)

    def forward_window(self, window_ids, start, kv):
        canvas = self.canvases[-1].clone()
        canvas[:, start : start + window_ids.shape[1]] = window_ids
        self._record("window", canvas, (start, window_ids.shape[1]))
        return self.model.forward_window(window_ids, start, kv)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)

    def commits(self, final, mask_id):
        """Positions filled between consecutive forwards (the last one up to `final`)."""
        states = [*self.canvases, final]
        return [
            int((a == mask_id).sum() - (b == mask_id).sum()) for a, b in itertools.pairwise(states)
        ]


class TableLM:
    """Fake reference model: hidden row i = table[i] whatever the tokens; logits = hidden."""

    def __init__(self, table):
        self.table = table

    def forward_hidden(self, x):
        return self.table[None, : x.shape[1]]

    def forward_with_kv(self, x):
        return self.forward_hidden(x), []

    def forward_window(self, window_ids, start, kv):
        return self.table[None, start : start + window_ids.shape[1]]

    def compute_logits(self, hidden):
        return hidden


# The model primitives


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize(("style", "start", "end"), [("dual", 13, 21), ("prefix", 13, 40)])
def test_window_over_its_own_kv_reproduces_the_full_forward(
    arch, style, start, end, llada_tiny, dream_tiny
):
    model = llada_tiny if arch == "llada" else dream_tiny
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(3))
    ids[0, 20:] = LLADA_MASK if arch == "llada" else DREAM_MASK
    hidden, kv = model.forward_with_kv(ids)
    assert torch.equal(hidden, model.forward_hidden(ids))
    kv_heads = 4 if arch == "llada" else 2
    assert len(kv) == 2 and all(t.shape == (1, kv_heads, 40, 16) for pair in kv for t in pair)
    window = model.forward_window(ids[:, start:end], start, kv)
    assert window.shape == (1, end - start, 64)
    assert _rel(window, hidden[:, start:end]) < 1e-5


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_cached_keys_are_post_rope_and_before_gqa(arch, llada_tiny, dream_tiny):
    model = llada_tiny if arch == "llada" else dream_tiny
    ids = _ids([3, 99, 250, 7, 640, 12])
    _, kv = model.forward_with_kv(ids)
    if arch == "llada":
        block = model.model.transformer["blocks"][0]
        h = block.attn_norm(model.model.transformer["wte"](ids))
        k_proj, v_proj, theta = block.k_proj, block.v_proj, 500000.0
    else:
        layer = model.model.layers[0]
        h = layer.input_layernorm(model.model.embed_tokens(ids))
        k_proj, v_proj, theta = layer.self_attn.k_proj, layer.self_attn.v_proj, 1000000.0
    k, v = (p(h).view(1, 6, -1, 16).transpose(1, 2) for p in (k_proj, v_proj))
    k = apply_rope(k, *rope_cos_sin(torch.arange(6)[None], 16, theta))
    torch.testing.assert_close(kv[0][0], k)
    torch.testing.assert_close(kv[0][1], v)


def test_window_attends_with_its_fresh_kv_and_leaves_the_cache_alone(tmp_path):
    # One layer: every position's K/V depends on its own token only, so splicing the window's
    # fresh K/V into the old cache is exactly the full forward of the new canvas.
    model = LLaDAModel.from_pretrained(write_checkpoint(tmp_path / "l1", "llada", layers=1, seed=2))
    old = _ids([5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    new = old.clone()
    new[0, 4:7] = torch.tensor([500, 600, 700])
    _, kv = model.forward_with_kv(old)
    before = [(k.clone(), v.clone()) for k, v in kv]
    window = model.forward_window(new[:, 3:8], 3, kv)
    assert _rel(window, model.forward_hidden(new)[:, 3:8]) < 1e-5
    assert _rel(window, model.forward_hidden(old)[:, 3:8]) > 1e-3
    assert all(
        torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(kv, before, strict=True)
    )


def test_forward_with_kv_keeps_the_attention_function_swappable(dream_tiny):
    ids = _ids([1, 2, 3, 4, 5, 6])
    halved = [lambda q, k, v: 0.5 * torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v] * 2
    hidden, _ = dream_tiny.forward_with_kv(ids, attn_fn=halved)
    torch.testing.assert_close(hidden, dream_tiny.forward_hidden(ids, attn_fn=halved))
    assert _rel(hidden, dream_tiny.forward_hidden(ids)) > 1e-3


@pytest.mark.parametrize(("start", "length", "value"), [(8, 4, r"\[8, 12\)"), (-1, 2, "-1")])
def test_window_outside_the_cache_is_refused(llada_tiny, start, length, value):
    _, kv = llada_tiny.forward_with_kv(_ids(list(range(10))))
    with pytest.raises(ValueError, match=value):
        llada_tiny.forward_window(_ids([1] * length), start, kv)


# Commit rules


@pytest.mark.parametrize(
    ("confidence", "factor", "count"),
    [
        # f = 1: t = [-1, 2/3, 3/4, 4/5]; c_2 = 0.7 < 3/4 stops at 2.
        ([0.9, 0.8, 0.7, 0.1], 1.0, 2),
        # c_1 fails at once: one token.
        ([0.5, 0.3, 0.2, 0.1], 1.0, 1),
        # Order does not matter: sorted first.
        ([0.1, 0.7, 0.9, 0.8], 1.0, 2),
        # All pass: none fails, top = n - 1, plus one.
        ([0.99, 0.95, 0.9, 0.85], 1.0, 4),
        # Boundary: only the last fails (0.1 < 4/5), yet all four are committed.
        ([0.99, 0.95, 0.9, 0.1], 1.0, 4),
        # Boundary: a single candidate (top == 0) is committed.
        ([0.01], 1.0, 1),
        # Two candidates are always both committed.
        ([0.5, 0.0], 1.0, 2),
        # c_j == t_j passes (f = 2: t_1 = 1 - 2/3).
        ([0.9, 1 - 2 / 3, 0.0, 0.0], 2.0, 2),
        # A large factor lowers the thresholds: t = [-1, -1/3, 0, 1/5, 1/3], c_3 = 0.05 < 1/5.
        ([0.3, 0.2, 0.1, 0.05, 0.01], 4.0, 3),
    ],
)
def test_factor_count_transcribes_the_published_rule(confidence, factor, count):
    assert factor_transfer_count(torch.tensor(confidence, dtype=torch.float64), factor) == count


def test_factor_and_threshold_choose_the_most_confident():
    confidence = torch.tensor([0.1, 0.7, 0.95, 0.8], dtype=torch.float64)
    assert select_factor(confidence, 1.0).tolist() == [False, False, True, True]
    assert select_threshold(confidence, 0.75).tolist() == [False, False, True, True]
    # Nothing passes: the most confident goes anyway, the first of a tie.
    tied = torch.tensor([0.2, 0.5, 0.5])
    assert select_threshold(tied, 0.9).tolist() == [False, True, False]


def test_llada_proposals_draw_gumbel_noise_for_the_candidate_rows_only():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    x0 = llada_proposals(logits, 0.8, torch.Generator().manual_seed(5))
    u = torch.rand(3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x0, torch.argmax(logits.double().exp() / (-torch.log(u)) ** 0.8, dim=-1))
    assert torch.equal(llada_proposals(logits, 0.0), logits.argmax(-1))


# LLaDA loops

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
SETTINGS = [(16, 8, 8), (16, 8, 16), (24, 8, 9), (16, 16, 4), (16, 4, 16)]


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"P{len(p)}")
@pytest.mark.parametrize(("gen_length", "block_length", "steps"), SETTINGS, ids=lambda v: str(v))
def test_llada_fast_schedule_equals_llada_generate(
    llada_tiny, prompt, gen_length, block_length, steps
):
    kwargs = {"steps": steps, "gen_length": gen_length, "block_length": block_length}
    expected = llada_generate(llada_tiny, _ids(prompt), mask_id=LLADA_MASK, **kwargs)
    got = llada_generate_fast(llada_tiny, _ids(prompt), mask_id=LLADA_MASK, **kwargs)
    assert torch.equal(got.x, expected)
    assert got.nfe == steps and sum(got.commits) == gen_length


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"P{len(p)}")
@pytest.mark.parametrize(("gen_length", "block_length"), [(16, 8), (24, 8), (16, 4)])
def test_threshold_one_commits_one_token_per_step(llada_tiny, prompt, gen_length, block_length):
    # Steps equal to gen_length give llada_generate one token per step too. On these prompts no
    # float32 / float64 near-tie separates the two confidences.
    got = llada_generate_fast(
        llada_tiny,
        _ids(prompt),
        steps=gen_length,
        gen_length=gen_length,
        block_length=block_length,
        mask_id=LLADA_MASK,
        threshold=1.0,
    )
    assert got.commits == [1] * gen_length and got.nfe == gen_length
    expected = llada_generate(
        llada_tiny,
        _ids(prompt),
        steps=gen_length,
        gen_length=gen_length,
        block_length=block_length,
        mask_id=LLADA_MASK,
    )
    assert torch.equal(got.x, expected)


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_tiny_threshold_commits_a_whole_block_per_step(llada_tiny, cache):
    got = LLADA_LOOPS[cache](
        llada_tiny,
        _ids([5, 6, 7]),
        steps=6,
        gen_length=24,
        block_length=8,
        mask_id=LLADA_MASK,
        threshold=1e-12,
    )
    assert got.nfe == 3 and got.commits == [8, 8, 8]
    assert not (got.x == LLADA_MASK).any()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", RULES)
def test_cached_llada_refreshes_each_block_then_runs_windows(llada_tiny, cache, rule):
    prompt, gen_length, block_length = _ids([5, 6, 7, 8, 9]), 24, 8
    log = CallLog(llada_tiny)
    got = LLADA_LOOPS[cache](
        log,
        prompt,
        steps=12,
        gen_length=gen_length,
        block_length=block_length,
        mask_id=LLADA_MASK,
        **RULES[rule],
    )
    final = got.x
    assert not (final == LLADA_MASK).any() and torch.equal(final[:, :5], prompt)
    assert got.nfe == len(log.kinds) == len(got.commits) and sum(got.commits) == gen_length
    assert got.commits == log.commits(final, LLADA_MASK)
    if rule == "schedule":
        assert got.commits == [2] * 12
    for kind, canvas, window in zip(log.kinds, log.canvases, log.windows, strict=True):
        # The current block is the first one with a [MASK]; everything after it is untouched.
        first_mask = int((canvas[0, 5:] == LLADA_MASK).nonzero()[0])
        start = 5 + block_length * (first_mask // block_length)
        if kind == "refresh":
            assert (canvas[0, start:] == LLADA_MASK).all()
        else:
            assert kind == "window"
            assert window == (start, 29 - start if cache == "prefix" else block_length)
        # Committed tokens never change.
        kept = canvas != LLADA_MASK
        assert torch.equal(canvas[kept], final[kept])
    assert log.kinds.count("refresh") == 3


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"P{len(p)}")
def test_one_block_with_tiny_threshold_runs_only_the_refresh(llada_tiny, cache, prompt):
    kwargs = {"steps": 4, "gen_length": 16, "block_length": 16, "mask_id": LLADA_MASK}
    plain = llada_generate_fast(llada_tiny, _ids(prompt), threshold=1e-12, **kwargs)
    cached = LLADA_LOOPS[cache](llada_tiny, _ids(prompt), threshold=1e-12, **kwargs)
    assert torch.equal(cached.x, plain.x) and cached.nfe == plain.nfe == 1


def test_llada_threshold_commits_confident_candidates_of_the_current_block_only():
    vocab, mask = 32, 31
    table = torch.zeros(10, vocab)
    # Position i proposes token 10 + i; block 1 (positions 6..9) is the most confident.
    strengths = [0, 0, 12.0, 1.0, 12.0, 0.5, 20.0, 20.0, 20.0, 20.0]
    for i, strength in enumerate(strengths):
        table[i, 10 + i] = strength
    log = CallLog(TableLM(table))
    got = llada_generate_fast(
        log, _ids([1, 2]), steps=2, gen_length=8, block_length=4, mask_id=mask, threshold=0.9
    )
    assert got.x[0, 2:].tolist() == list(range(12, 20))
    # Step 0 commits the two confident positions of block 0 (2 and 4), nothing of block 1.
    assert (log.canvases[1][0] != mask).nonzero().flatten().tolist() == [0, 1, 2, 4]
    assert got.commits[:3] == [2, 1, 1] and got.commits[3:] == [4]


@pytest.mark.parametrize("cache", CACHE_MODES)
@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 1.0}, {"temperature": 0.5, "threshold": 0.5}, {"remasking": "random"}],
    ids=["gumbel", "gumbel-threshold", "random"],
)
def test_llada_sampling_follows_the_generator(llada_tiny, cache, kwargs):
    def run(seed):
        return LLADA_LOOPS[cache](
            llada_tiny,
            _ids([5, 6, 7]),
            steps=8,
            gen_length=16,
            block_length=8,
            mask_id=LLADA_MASK,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )

    first = run(0)
    assert torch.equal(first.x, run(0).x) and first.commits == run(0).commits
    assert any(not torch.equal(first.x, run(seed).x) for seed in range(1, 4))


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"gen_length": 10}, "10"),
        ({"steps": 5}, "steps 5"),
        ({"steps": 32}, "steps 32"),
        ({"threshold": 0.9, "factor": 1.0}, "not both"),
        ({"threshold": 1.5}, "1.5"),
        ({"threshold": 0.0}, "threshold"),
        ({"factor": 0.0}, "factor"),
        ({"remasking": "random", "threshold": 0.9}, "random"),
        ({"remasking": "random", "factor": 1.0}, "random"),
        ({"remasking": "top_prob"}, "top_prob"),
        ({"temperature": -1.0}, "-1.0"),
    ],
)
def test_llada_loops_reject_bad_arguments(kwargs, value):
    args = {"steps": 8, "gen_length": 16, "block_length": 8, "mask_id": 7} | kwargs
    for loop in LLADA_LOOPS.values():
        with pytest.raises(ValueError, match=value):
            loop(TableLM(torch.zeros(40, 8)), _ids([1]), **args)


def test_llada_loops_take_one_sequence():
    with pytest.raises(ValueError, match="batch size must be 1, got 2"):
        llada_generate_fast(
            TableLM(torch.zeros(40, 8)),
            _ids([1], [2]),
            steps=8,
            gen_length=16,
            block_length=8,
            mask_id=7,
        )


# Dream blockwise loop

DREAM_RULES = {
    "threshold": {"threshold": 0.9},
    "factor": {"factor": 1.0},
    "entropy": {},
    "maskgit_plus": {"alg": "maskgit_plus"},
    "topk_margin": {"alg": "topk_margin"},
    "origin-sampled": {"alg": "origin", "alg_temp": 0.5, "temperature": 0.7, "top_p": 0.9},
}


def _dream_schedule(block_length: int, steps_per_block: int, eps: float = 1e-3) -> list[int]:
    """Commits of one block under the timestep schedule, computed independently."""
    ts = torch.linspace(1, eps, steps_per_block + 1)
    commits, remaining = [1], block_length - 1
    for i in range(1, steps_per_block):
        last = i == steps_per_block - 1
        k = remaining if last else int(torch.tensor(float(remaining)) * (1 - ts[i + 1] / ts[i]))
        commits.append(k)
        remaining -= k
    return commits


@pytest.mark.parametrize("cache", CACHE_MODES)
@pytest.mark.parametrize("rule", DREAM_RULES)
def test_dream_block_loop_commits_every_position(dream_tiny, cache, rule):
    prompt, block_length = _ids([5, 6, 7, 8]), 8
    log = CallLog(dream_tiny)
    got = dream_generate_block(
        log,
        prompt,
        max_new_tokens=24,
        steps=12,
        block_length=block_length,
        mask_id=DREAM_MASK,
        cache=cache,
        generator=torch.Generator().manual_seed(0),
        **DREAM_RULES[rule],
    )
    final = got.x
    assert not (final == DREAM_MASK).any() and torch.equal(final[:, :4], prompt)
    assert got.nfe == len(log.kinds) == len(got.commits) and sum(got.commits) == 24
    assert got.commits == log.commits(final, DREAM_MASK)
    if "threshold" not in DREAM_RULES[rule] and "factor" not in DREAM_RULES[rule]:
        assert got.commits == _dream_schedule(block_length, 4) * 3
    for step, (canvas, kind) in enumerate(zip(log.canvases, log.kinds, strict=True)):
        kept = canvas != DREAM_MASK
        assert torch.equal(canvas[kept], final[kept])
        first_mask = int((canvas[0, 4:] == DREAM_MASK).nonzero()[0])
        start = 4 + block_length * (first_mask // block_length)
        if (canvas[0, start:] == DREAM_MASK).all():
            # A block's step 0: a full forward, which commits the block start and nothing else.
            assert kind == ("full" if cache == "none" else "refresh")
            after = log.canvases[step + 1] if step + 1 < len(log.canvases) else final
            changed = (after[0] != canvas[0]).nonzero().flatten().tolist()
            assert changed == [start] and got.commits[step] == 1
        else:
            assert kind == ("full" if cache == "none" else "window")


@pytest.mark.parametrize("cache", CACHE_MODES)
@pytest.mark.parametrize("rule", ["threshold", "factor", "entropy"])
def test_dream_reads_the_row_before_each_position(cache, rule):
    vocab, mask = 64, 63
    table = torch.zeros(12, vocab)
    for i in range(12):
        table[i, 20 + i] = 30.0
    got = dream_generate_block(
        TableLM(table),
        _ids([1, 2, 3, 4]),
        max_new_tokens=8,
        steps=4,
        block_length=4,
        mask_id=mask,
        cache=cache,
        **DREAM_RULES[rule],
    )
    # Position j takes row j - 1's token, 20 + j - 1, in full and window forwards alike.
    assert got.x[0, 4:].tolist() == [23 + j for j in range(8)]
    if rule != "entropy":
        # Certain proposals: step 0 commits the block start, the next step the rest.
        assert got.commits == [1, 3, 1, 3]


def test_dream_block_loop_without_a_generator_is_greedy_and_repeatable(dream_tiny):
    kwargs = {"max_new_tokens": 16, "steps": 8, "block_length": 8, "mask_id": DREAM_MASK}
    a = dream_generate_block(dream_tiny, _ids([5, 6]), cache="dual", **kwargs)
    b = dream_generate_block(
        dream_tiny, _ids([5, 6]), cache="dual", generator=torch.Generator().manual_seed(1), **kwargs
    )
    assert torch.equal(a.x, b.x) and a.commits == b.commits


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"steps": 2}, "steps 2 give 1 steps per block"),
        ({"cache": "full"}, "full"),
        ({"threshold": 0.9, "factor": 1.0}, "not both"),
        ({"max_new_tokens": 12}, "12"),
        ({"steps": 3}, "steps 3"),
        ({"block_length": 0}, "block_length"),
        ({"alg": "greedy"}, "greedy"),
        ({"factor": -1.0}, "-1.0"),
    ],
)
def test_dream_block_loop_rejects_bad_arguments(kwargs, value):
    args = {"max_new_tokens": 16, "steps": 8, "block_length": 8, "mask_id": 7} | kwargs
    with pytest.raises(ValueError, match=value):
        dream_generate_block(TableLM(torch.zeros(40, 8)), _ids([1]), **args)


def test_dream_threshold_runs_with_one_step_per_block(dream_tiny):
    # The schedule needs two steps per block; threshold decoding does not use the step count.
    got = dream_generate_block(
        dream_tiny,
        _ids([5, 6]),
        max_new_tokens=16,
        steps=2,
        block_length=8,
        mask_id=DREAM_MASK,
        cache="prefix",
        threshold=1e-12,
    )
    assert got.commits == [1, 7, 1, 7] and got.nfe == 4
    with pytest.raises(ValueError, match="batch size must be 1"):
        dream_generate_block(
            dream_tiny, _ids([5], [6]), max_new_tokens=8, steps=2, block_length=8, mask_id=1
        )
