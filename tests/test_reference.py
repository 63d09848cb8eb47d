"""Reference models and samplers: checks that fail on wrong architecture or sampling semantics."""

import itertools
import math

import pytest
import torch
from safetensors.torch import load_file

from sparsed_vllm.checkpoint import write_checkpoint
from sparsed_vllm.reference.generate import (
    add_gumbel_noise,
    dream_generate,
    get_num_transfer_tokens,
    llada_generate,
    sample_tokens,
    top_k_logits,
    top_p_logits,
)
from sparsed_vllm.reference.models import (
    DreamModel,
    LLaDAModel,
    apply_rope,
    load_reference_model,
    rope_cos_sin,
)

pytestmark = pytest.mark.usefixtures("single_thread")

LLADA_MASK, DREAM_MASK = 1020, 1023


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


class Recorder:
    """Wraps a model; keeps a copy of every input canvas."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def __call__(self, x):
        self.inputs.append(x.clone())
        return self.model(x)


class TableModel:
    """Fake model: logits[b, i] = table[i] whatever the input (optionally `uncond` for CFG)."""

    def __init__(self, table, uncond=None, mask_id=None):
        self.table, self.uncond, self.mask_id = table, uncond, mask_id

    def __call__(self, x):
        rows = []
        for seq in x:
            is_uncond = self.uncond is not None and seq[0].item() == self.mask_id
            rows.append((self.uncond if is_uncond else self.table)[: x.shape[1]])
        return torch.stack(rows)


# Reference models


def _manual_rope(x, positions, theta):
    """RoPE as complex rotation of pairs (j, j + D/2). x: [L, H, D] float64."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions.double()[:, None, None] * freq  # [L, 1, D/2]
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def _manual_attention(h, w, prefix, names, heads, kv_heads, theta, bias):
    """Bidirectional softmax attention with explicit GQA head map. h: [L, d] float64."""
    seq, head_dim = h.shape[0], h.shape[1] // heads
    proj = {}
    for key in ("q", "k", "v"):
        name = prefix + names[key]
        proj[key] = h @ w[name + ".weight"].T + (w[name + ".bias"] if bias else 0)
    q = _manual_rope(proj["q"].view(seq, heads, head_dim), torch.arange(seq), theta)
    k = _manual_rope(proj["k"].view(seq, kv_heads, head_dim), torch.arange(seq), theta)
    v = proj["v"].view(seq, kv_heads, head_dim)
    kv_of = [hq * kv_heads // heads for hq in range(heads)]
    out = torch.empty(seq, heads, head_dim, dtype=torch.float64)
    for hq in range(heads):
        scores = q[:, hq] @ k[:, kv_of[hq]].T / math.sqrt(head_dim)
        out[:, hq] = torch.softmax(scores, dim=-1) @ v[:, kv_of[hq]]
    return out.reshape(seq, -1) @ w[prefix + names["o"] + ".weight"].T


def _manual_rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def test_llada_matches_a_manual_one_layer_computation(tmp_path):
    path = write_checkpoint(tmp_path / "l1", "llada", layers=1, seed=7)
    w = {k: v.double() for k, v in load_file(path / "model.safetensors").items()}
    ids = torch.tensor([5, 17, 300, 1020, 1020, 42, 1020])
    p = "model.transformer.blocks.0."
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out"}
    x = w["model.transformer.wte.weight"][ids]
    x = x + _manual_attention(
        _manual_rms(x, w[p + "attn_norm.weight"], 1e-5), w, p, names, 4, 4, 500000.0, bias=False
    )
    h = _manual_rms(x, w[p + "ff_norm.weight"], 1e-5)
    gate, up = h @ w[p + "ff_proj.weight"].T, h @ w[p + "up_proj.weight"].T
    x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "ff_out.weight"].T
    x = _manual_rms(x, w["model.transformer.ln_f.weight"], 1e-5)
    expected = x @ w["model.transformer.ff_out.weight"].T
    got = LLaDAModel.from_pretrained(path)(ids[None])[0].double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_dream_matches_a_manual_one_layer_computation_with_gqa(tmp_path):
    path = write_checkpoint(tmp_path / "d1", "dream", layers=1, seed=7)
    w = {k: v.double() for k, v in load_file(path / "model.safetensors").items()}
    ids = torch.tensor([5, 17, 300, 1023, 1023, 42, 1023])
    p = "model.layers.0."
    names = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
    }
    x = w["model.embed_tokens.weight"][ids]
    x = x + _manual_attention(
        _manual_rms(x, w[p + "input_layernorm.weight"], 1e-6),
        w,
        p,
        names,
        4,
        2,
        1000000.0,
        bias=True,
    )
    h = _manual_rms(x, w[p + "post_attention_layernorm.weight"], 1e-6)
    gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    expected = _manual_rms(x, w["model.norm.weight"], 1e-6) @ w["lm_head.weight"].T
    got = DreamModel.from_pretrained(path)(ids[None])[0].double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_attention_is_bidirectional(arch, llada_tiny, dream_tiny):
    model = llada_tiny if arch == "llada" else dream_tiny
    ids = _ids([11, 12, 13, 14, 15, 16, 17, 18])
    changed = ids.clone()
    changed[0, -1] = 500
    before, after = model(ids), model(changed)
    # The first position sees the last one.
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_logits_depend_on_relative_positions_only(arch, llada_tiny, dream_tiny):
    model = llada_tiny if arch == "llada" else dream_tiny
    ids = _ids([3, 99, 250, 7, 7, 7, 640, 12, 5])
    base = model(ids)
    shifted = model(ids, positions=torch.arange(ids.shape[1]) + 37)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    # With RoPE the model is not permutation-equivariant: order matters.
    perm = torch.tensor([8, 0, 4, 2, 6, 1, 7, 3, 5])
    assert (model(ids[:, perm]) - base[:, perm]).abs().max() > 1e-2


def test_rope_dot_products_depend_on_offset_only():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16, generator=gen), torch.randn(1, 2, 1, 16, generator=gen)

    def score(pq, pk):
        rq = apply_rope(q, *rope_cos_sin(torch.tensor([[pq]]), 16, 500000.0))
        rk = apply_rope(k, *rope_cos_sin(torch.tensor([[pk]]), 16, 500000.0))
        return (rq * rk).sum(-1)

    torch.testing.assert_close(score(3, 10), score(103, 110), rtol=1e-5, atol=1e-5)
    assert (score(3, 10) - score(3, 11)).abs().max() > 1e-3
    # Position 0 is the identity.
    torch.testing.assert_close(apply_rope(q, *rope_cos_sin(torch.tensor([[0]]), 16, 1e4)), q)


def test_swappable_attention_and_row_subset_logits(dream_tiny):
    ids = _ids([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
    base = dream_tiny(ids)

    def manual(q, k, v):
        assert q.shape == k.shape == v.shape == (2, 4, 6, 16)
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v

    torch.testing.assert_close(dream_tiny(ids, attn_fn=manual), base, rtol=1e-5, atol=1e-5)
    zero_second = [manual, lambda q, k, v: torch.zeros_like(q)]
    assert (dream_tiny(ids, attn_fn=zero_second) - base).abs().max() > 1e-2
    hidden = dream_tiny.forward_hidden(ids)
    rows = dream_tiny.compute_logits(hidden[:, [1, 4]])
    torch.testing.assert_close(rows, base[:, [1, 4]])


def test_bfloat16_load_is_close_to_float32(llada_tiny_dir, llada_tiny):
    ids = _ids([5, 6, 7, LLADA_MASK, LLADA_MASK])
    bf16 = load_reference_model(llada_tiny_dir, dtype=torch.bfloat16)
    assert bf16.model.transformer["wte"].weight.dtype == torch.bfloat16
    ref = llada_tiny(ids)
    rel = (bf16(ids).float() - ref).norm() / ref.norm()
    assert rel < 0.05


# LLaDA generation


def test_num_transfer_tokens_schedule():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, :5] = True
    assert get_num_transfer_tokens(mask, 3).tolist() == [[3, 3, 2], [2, 2, 1]]


def _committed_per_step(inputs, final, mask_id):
    states = [*inputs, final]
    return [int((a == mask_id).sum() - (b == mask_id).sum()) for a, b in itertools.pairwise(states)]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_commits_the_schedule_block_by_block(llada_tiny, remasking):
    prompt = _ids([5, 6, 7, 8, 9])
    rec = Recorder(llada_tiny)
    out = llada_generate(
        rec,
        prompt,
        steps=9,
        gen_length=24,
        block_length=8,
        remasking=remasking,
        mask_id=LLADA_MASK,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (1, 29) and torch.equal(out[:, :5], prompt)
    assert not (out == LLADA_MASK).any()
    assert _committed_per_step(rec.inputs, out, LLADA_MASK) == [3, 3, 2] * 3
    for step, x in enumerate(rec.inputs):
        block_start = 5 + 8 * (step // 3)
        assert not (x[0, 5:block_start] == LLADA_MASK).any()
        assert (x[0, block_start + 8 :] == LLADA_MASK).all()


def test_llada_commits_most_confident_inside_the_current_block_only():
    vocab, prompt_len = 64, 2
    table = torch.zeros(10, vocab)
    # Canvas position i proposes token 10 + i; later positions are more confident.
    for i in range(10):
        table[i, 10 + i] = 1.0 + 0.5 * i
    rec = Recorder(TableModel(table))
    out = llada_generate(rec, _ids([1, 2]), steps=4, gen_length=8, block_length=4, mask_id=63)
    assert out[0, prompt_len:].tolist() == list(range(12, 20))
    # Step 1 commits the 2 most confident positions of block 0 (5 and 4), not of block 1.
    second = rec.inputs[1][0]
    assert (second != 63).nonzero().flatten().tolist() == [0, 1, 4, 5]


def test_llada_greedy_is_deterministic_and_ignores_the_generator(llada_tiny):
    prompt = _ids([5, 6, 7])
    kwargs = {"steps": 4, "gen_length": 8, "block_length": 4, "mask_id": LLADA_MASK}
    a = llada_generate(llada_tiny, prompt, **kwargs)
    b = llada_generate(llada_tiny, prompt, **kwargs, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_llada_sampling_follows_the_generator(llada_tiny):
    prompt = _ids([5, 6, 7])
    kwargs = {"steps": 4, "gen_length": 8, "block_length": 4, "mask_id": LLADA_MASK}

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return llada_generate(llada_tiny, prompt, **kwargs, temperature=1.0, generator=generator)

    assert torch.equal(run(1), run(1))
    greedy = llada_generate(llada_tiny, prompt, **kwargs)
    assert any(not torch.equal(run(seed), greedy) for seed in range(3))


def test_gumbel_noise_is_float64_power_of_log_uniform():
    # exp(100) overflows float32 but not float64.
    logits = torch.tensor([[0.5, -1.0, 2.0, 100.0]])
    noisy = add_gumbel_noise(logits, 0.7, torch.Generator().manual_seed(4))
    u = torch.rand(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert noisy.dtype == torch.float64
    assert torch.isfinite(noisy).all()
    torch.testing.assert_close(noisy, logits.double().exp() / (-torch.log(u)) ** 0.7)
    assert add_gumbel_noise(logits, 0.0) is logits


def test_llada_cfg_masks_the_prompt_and_extrapolates():
    vocab, mask = 16, 15
    cond, uncond = torch.zeros(6, vocab), torch.zeros(6, vocab)
    cond[:, 5], cond[:, 6] = 1.0, 0.6
    uncond[:, 5] = 1.0
    rec = Recorder(TableModel(cond, uncond, mask_id=mask))
    kwargs = {"steps": 4, "gen_length": 4, "block_length": 4, "mask_id": mask}
    # cond alone picks 5; un + (1 + 1) * (cond - un) favours 6 (1.2 > 1.0); un + 1 * (...) not.
    assert llada_generate(rec, _ids([1, 2]), **kwargs)[0, 2:].tolist() == [5] * 4
    guided = llada_generate(rec, _ids([1, 2]), **kwargs, cfg_scale=1.0)
    assert guided[0, 2:].tolist() == [6] * 4
    batch = rec.inputs[-1]
    assert batch.shape[0] == 2 and batch[1, :2].tolist() == [mask, mask]
    assert torch.equal(batch[0, 2:], batch[1, 2:])


def test_llada_cfg_changes_the_tiny_model_output(llada_tiny):
    kwargs = {"steps": 8, "gen_length": 16, "block_length": 8, "mask_id": LLADA_MASK}
    prompt = _ids([5, 6, 7, 8])
    plain = llada_generate(llada_tiny, prompt, **kwargs)
    assert not torch.equal(plain, llada_generate(llada_tiny, prompt, **kwargs, cfg_scale=3.0))


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"steps": 8, "gen_length": 10, "block_length": 4}, "10"),
        ({"steps": 5, "gen_length": 8, "block_length": 4}, "5"),
        ({"steps": 8, "gen_length": 8, "block_length": 4, "remasking": "top_prob"}, "top_prob"),
        ({"steps": 0, "gen_length": 8, "block_length": 4}, "0"),
        ({"steps": 8, "gen_length": 8, "block_length": 4, "temperature": -1.0}, "-1.0"),
    ],
)
def test_llada_rejects_bad_arguments(kwargs, value):
    with pytest.raises(ValueError, match=value):
        llada_generate(TableModel(torch.zeros(20, 8)), _ids([1]), mask_id=7, **kwargs)


# Dream generation


def test_dream_reads_shifted_logits():
    vocab, mask = 128, 127
    table = torch.zeros(12, vocab)
    for i in range(12):
        table[i, 100 + i] = 5.0
    for alg in ("origin", "maskgit_plus", "entropy", "topk_margin"):
        out = dream_generate(
            TableModel(table),
            _ids([1, 2, 3]),
            max_new_tokens=6,
            steps=3,
            alg=alg,
            mask_id=mask,
            generator=torch.Generator().manual_seed(0),
        )
        # Position i takes the prediction made at position i - 1.
        assert out[0, 3:].tolist() == [102, 103, 104, 105, 106, 107], alg


def test_dream_reveals_int_num_mask_times_one_minus_s_over_t(dream_tiny):
    rec = Recorder(dream_tiny)
    out = dream_generate(
        rec, _ids([5, 6, 7]), max_new_tokens=16, steps=6, alg="maskgit_plus", mask_id=DREAM_MASK
    )
    assert not (out == DREAM_MASK).any()
    timesteps = torch.linspace(1, 1e-3, 7)
    expected, remaining = [], 16
    for i in range(6):
        t, s = timesteps[i], timesteps[i + 1]
        n = int(remaining * (1 - s / t)) if i < 5 else remaining
        expected.append(n)
        remaining -= n
    assert _committed_per_step(rec.inputs, out, DREAM_MASK) == expected
    assert expected[0] == 2 and expected[-1] > 0


def _designed_rows(vocab):
    """Four prob rows: best top-1 (row 1), best margin (row 3), lowest entropy (row 2)."""
    designs = [[0.5, 0.5], [0.6] + [0.1] * 4, [0.55, 0.45], [0.58] + [0.02] * 21]
    # One spare row: the shift drops the last position's logits.
    rows = torch.full((len(designs) + 1, vocab), -30.0)
    for r, probs in enumerate(designs):
        rows[r, : len(probs)] = torch.log(torch.tensor(probs))
    return rows


@pytest.mark.parametrize(
    ("alg", "first"), [("maskgit_plus", 1), ("topk_margin", 3), ("entropy", 2)]
)
def test_dream_confidence_algs_reveal_their_most_confident_position(alg, first):
    vocab, mask, prompt = 32, 31, _ids([1])
    # Row r scores canvas position r + 1 after the shift, i.e. generated token r.
    rec = Recorder(TableModel(_designed_rows(vocab)))
    dream_generate(rec, prompt, max_new_tokens=4, steps=2, alg=alg, mask_id=mask)
    revealed = (rec.inputs[1][0, 1:] != mask).nonzero().flatten().tolist()
    assert revealed == [first]


@pytest.mark.parametrize(
    "kwargs", [{"alg": "origin", "temperature": 0.8}, {"alg": "entropy", "alg_temp": 0.5}]
)
def test_dream_random_draws_follow_the_generator(dream_tiny, kwargs):
    def run(seed):
        rec = Recorder(dream_tiny)
        out = dream_generate(
            rec,
            _ids([5, 6]),
            max_new_tokens=12,
            steps=4,
            mask_id=DREAM_MASK,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
        return out, torch.cat(rec.inputs)

    first, states = run(0)
    again, states_again = run(0)
    assert torch.equal(first, again) and torch.equal(states, states_again)
    assert not (first == DREAM_MASK).any()
    # Which positions are revealed when is random.
    assert any(not torch.equal(states, run(seed)[1]) for seed in range(1, 4))


def test_dream_origin_last_step_reveals_everything(dream_tiny):
    rec = Recorder(dream_tiny)
    # With eps 0.5 one step reveals each position with prob 0.5, except that the last step does all.
    out = dream_generate(
        rec,
        _ids([5]),
        max_new_tokens=16,
        steps=1,
        eps=0.5,
        mask_id=DREAM_MASK,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(rec.inputs) == 1 and not (out == DREAM_MASK).any()


def test_top_p_keeps_the_smallest_set_above_p_and_always_top1():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = top_p_logits(logits, 0.7) > torch.finfo(logits.dtype).min
    assert keep.tolist() == [[True, True, False, False]]
    keep = top_p_logits(logits, 0.1) > torch.finfo(logits.dtype).min
    assert keep.tolist() == [[True, False, False, False]]
    keep = top_k_logits(logits, 3) > torch.finfo(logits.dtype).min
    assert keep.tolist() == [[True, True, True, False]]


def test_sample_tokens_confidence_comes_from_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    conf, x0 = sample_tokens(logits, top_p=0.7)
    assert x0.tolist() == [0] and conf.item() == pytest.approx(0.5 / 0.8)
    conf, _ = sample_tokens(logits, top_k=1)
    assert conf.item() == pytest.approx(1.0)
    conf, _ = sample_tokens(logits, margin_confidence=True)
    assert conf.item() == pytest.approx(0.2)
    conf, _ = sample_tokens(logits, neg_entropy=True)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert conf.item() == pytest.approx((probs * torch.log(probs + 1e-10)).sum().item())


def test_sample_tokens_draws_from_the_tempered_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(400, 3)
    conf, x0 = sample_tokens(logits, temperature=0.5, generator=torch.Generator().manual_seed(0))
    tempered = torch.softmax(logits[0] / 0.5, dim=-1)  # [0.78, 0.20, 0.02]
    assert set(x0.tolist()) >= {0, 1}
    torch.testing.assert_close(conf, tempered[x0])
    assert abs((x0 == 0).float().mean().item() - tempered[0].item()) < 0.08


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"alg": "greedy"}, "greedy"),
        ({"steps": 0}, "0"),
        ({"top_p": 1.5}, "1.5"),
        ({"top_k": 0}, "0"),
        ({"eps": 1.0}, "1.0"),
        ({"max_new_tokens": -2}, "-2"),
    ],
)
def test_dream_rejects_bad_arguments(kwargs, value):
    args = {"max_new_tokens": 4, "mask_id": 7} | kwargs
    with pytest.raises(ValueError, match=value):
        dream_generate(TableModel(torch.zeros(20, 8)), _ids([1]), **args)
