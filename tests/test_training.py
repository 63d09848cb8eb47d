"""CPU checks of the training groundwork: task generator, diffusion loss, smoke checkpoint."""

import random
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

import tasks  # noqa: E402
import train  # noqa: E402

LENGTH = 400


def _recover(example: tasks.Example) -> str:
    """Answer each task from its prompt text alone, as an exact checker of the generator."""
    context, question = example.prompt.removesuffix(tasks.ANSWER_PREFIX).rsplit("\n", 1)
    if example.kind == "passkey":
        return re.search(r"The passkey is ([a-z ]+)\.", context).group(1)
    if example.kind == "kv":
        key = re.fullmatch(r"What is the value of (\S+)\?", question).group(1)
        return re.search(rf"^{re.escape(key)}: ([a-z ]+)$", context, re.M).group(1)
    if example.kind == "two_hop":
        key = re.fullmatch(r"What value does (\S+) lead to\?", question).group(1)
        hop = re.search(rf"^{re.escape(key)} -> (\S+)$", context, re.M).group(1)
        return re.search(rf"^{re.escape(hop)} = ([a-z ]+)$", context, re.M).group(1)
    if example.kind == "copy":
        tag = re.fullmatch(r"Repeat note (\d+) word for word\.", question).group(1)
        return re.search(rf"^Note {tag}: (.+)\.$", context, re.M).group(1)
    if example.kind == "copy_long":
        tag = re.fullmatch(r"Repeat note (\d+) word for word\.", question).group(1)
        return re.search(rf"^Note {tag}: (.+)\.$", context, re.M).group(1)
    if example.kind == "multi":
        order = re.fullmatch(r"List the codes of (.+)\.", question).group(1).split(", ")
        codes = [re.search(rf"The {c} code is ([a-z ]+)\.", context).group(1) for c in order]
        return ", ".join(codes)
    if example.kind == "arith":
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    return re.fullmatch(r"Say exactly: (.+)", question).group(1)


def test_tasks_deterministic():
    first = tasks.make_examples(24, seed=3, length=LENGTH)
    assert first == tasks.make_examples(24, seed=3, length=LENGTH)
    assert first != tasks.make_examples(24, seed=4, length=LENGTH)
    assert {e.kind for e in first} == set(tasks.TASKS)


@pytest.mark.parametrize("kind", tasks.TASKS)
def test_answers_recoverable_from_prompt(kind):
    examples = tasks.make_examples(30, seed=7, length=LENGTH, kinds=[kind])
    for example in examples:
        assert _recover(example) == example.answer
        assert tasks.is_correct(f" {example.answer}.", example)
    if kind in tasks.LONG_TASKS + tasks.BLOCK_TASKS:
        lengths = [tasks.approx_tokens(e.prompt) for e in examples]
        assert all(0.7 * LENGTH <= n <= 1.3 * LENGTH for n in lengths), lengths


def test_multi_block_answers_span_two_blocks_and_fit_the_canvas():
    tok = train.build_tokenizer("llada", 1024)
    count = train.token_counter(tok)
    for kind in tasks.BLOCK_TASKS:
        for example in tasks.make_examples(20, seed=2, length=1000, kinds=[kind], count=count):
            answer = len(tok.encode(" " + example.answer).ids)
            assert 32 < answer < train.PRESETS["long"][1].gen_len, (kind, answer)


def test_kv_keys_unique_and_needle_depth_varies():
    kv = tasks.make_examples(10, seed=1, length=LENGTH, kinds=["kv"])
    for example in kv:
        keys = re.findall(r"^(\S+): [a-z ]+$", example.prompt, re.M)
        assert len(keys) == len(set(keys)) > 20
    depths = {
        e.prompt.index("The passkey is") / len(e.prompt)
        for e in tasks.make_examples(10, seed=1, length=LENGTH, kinds=["passkey"])
    }
    assert max(depths) - min(depths) > 0.3


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="nope"):
        tasks.make_example("nope", random.Random(0), 10)


def _batch(tok, ids, gen_len=16):
    examples = tasks.make_examples(4, seed=0, length=60, count=train.token_counter(tok))
    return train.collate([train.encode_example(tok, e, ids, gen_len) for e in examples], ids.eos)


@pytest.fixture(scope="module")
def smoke_parts():
    shape, cfg = train.PRESETS["smoke"]
    tok = train.build_tokenizer("llada", shape.vocab)
    return shape, cfg, tok, train.TokenIds.for_vocab(shape.vocab)


def test_masking_touches_only_answer_tokens(smoke_parts):
    _, _, tok, ids = smoke_parts
    input_ids, answer_mask, valid = _batch(tok, ids)
    assert (answer_mask.sum(1) == 16).all() and (answer_mask <= valid).all()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        noisy, masked, t = train.mask_answers(input_ids, answer_mask, ids.mask, 1e-3, gen)
        assert (masked <= answer_mask).all()
        assert torch.equal(noisy[~masked], input_ids[~masked])
        assert (noisy[masked] == ids.mask).all()
        assert ((t >= 1e-3) & (t <= 1)).all()
    many = torch.zeros_like(answer_mask)
    for _ in range(20):
        many |= train.mask_answers(input_ids, answer_mask, ids.mask, 1e-3, gen)[1]
    assert torch.equal(many, answer_mask)


def test_diffusion_loss_finite_and_answer_only(smoke_parts):
    shape, _, tok, ids = smoke_parts
    torch.manual_seed(0)
    model = train.build_model(shape, "cpu")
    input_ids, answer_mask, valid = _batch(tok, ids)
    loss = train.diffusion_loss(
        model, input_ids, answer_mask, valid, ids.mask, generator=torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grad = model.model.transformer["wte"].weight.grad
    assert torch.isfinite(grad).all()
    # With no answer tokens nothing is masked: the prompt carries no loss.
    no_answer = torch.zeros_like(answer_mask)
    prompt_only = train.diffusion_loss(model, input_ids, no_answer, valid, ids.mask)
    assert prompt_only.item() == 0.0


def test_padding_keys_do_not_change_hidden_states(smoke_parts):
    shape, _, tok, ids = smoke_parts
    torch.manual_seed(0)
    model = train.build_model(shape, "cpu").eval()
    x = torch.randint(0, 200, (1, 20))
    padded = torch.cat([x, torch.full((1, 7), ids.eos)], dim=1)
    valid = torch.zeros_like(padded, dtype=torch.bool)
    valid[:, :20] = True
    with torch.no_grad():
        ref = model.forward_hidden(x)
        out = model.forward_hidden(padded, attn_fn=train.padded_attention(valid))[:, :20]
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_smoke_training_writes_loadable_checkpoint(tmp_path, smoke_parts):
    from transformers import AutoTokenizer

    from sparsed_vllm.configs import register_configs
    from sparsed_vllm.reference.models import LLaDAModel

    shape, cfg, _, ids = smoke_parts
    cfg = train.dataclasses.replace(cfg, steps=6)
    model, _, steps = train.train(shape, cfg, "cpu", seed=0, log_every=100)
    assert steps == 6
    out = train.save_checkpoint(model, shape, tmp_path / "ckpt", dtype=torch.float32)

    loaded = LLaDAModel.from_pretrained(out)
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    register_configs()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.mask_token_id == ids.mask and tok.eos_token_id == ids.eos
    example = tasks.make_examples(1, seed=0, length=50)[0]
    prompt, canvas = train.encode_example(
        train.Tokenizer.from_file(str(out / "tokenizer.json")), example, ids, 16
    )
    assert prompt[1:] == tok.encode(example.prompt, add_special_tokens=False)
    assert tok.decode(canvas, skip_special_tokens=True).strip() == example.answer
    with torch.no_grad():
        logits = loaded(torch.tensor([prompt + canvas]))
    assert logits.shape == (1, len(prompt) + 16, shape.vocab) and torch.isfinite(logits).all()


def test_balanced_loss_weights_eos_padding_as_one_token(smoke_parts):
    shape, _, tok, ids = smoke_parts
    torch.manual_seed(0)
    model = train.build_model(shape, "cpu")
    input_ids, answer_mask, valid = _batch(tok, ids)
    loss = train.diffusion_loss(
        model, input_ids, answer_mask, valid, ids.mask, 1e-3,
        torch.Generator().manual_seed(3), "balanced", ids.eos,
    )  # fmt: skip
    # The same masks, then a per-token loop: answer tokens weigh 1, each of a row's n EOS 1/n.
    noisy, masked, _ = train.mask_answers(
        input_ids, answer_mask, ids.mask, 1e-3, torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        logp = model(noisy, attn_fn=train.padded_attention(valid)).float().log_softmax(-1)
    total = weights = 0.0
    for b in range(input_ids.shape[0]):
        n_eos = int(((input_ids[b] == ids.eos) & answer_mask[b]).sum())
        for i in masked[b].nonzero().flatten().tolist():
            w = 1.0 / n_eos if input_ids[b, i] == ids.eos else 1.0
            total += -w * logp[b, i, input_ids[b, i]].item()
            weights += w
    assert masked.any() and abs(loss.item() - total / weights) < 1e-4 * (total / weights)
    with pytest.raises(ValueError, match="eos_id"):
        train.diffusion_loss(model, input_ids, answer_mask, valid, ids.mask, weighting="balanced")


def test_batches_depend_on_step_only_and_full_masking(smoke_parts):
    shape, cfg, _, _ = smoke_parts
    batches = train.Batches(cfg, shape.vocab, seed=5)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2)
    for step, batch in enumerate(loader):
        for a, b in zip(batch, batches[step], strict=True):
            assert torch.equal(a, b)
        if step == 3:
            break
    assert not torch.equal(batches[0][0], train.Batches(cfg, shape.vocab, seed=6)[0][0])
    full = train.Batches(train.dataclasses.replace(cfg, full_mask_frac=1.0), shape.vocab, 5)[2]
    input_ids, answer_mask, valid, blockwise = full
    assert torch.equal(answer_mask[:, 1:], valid[:, 1:]) and not answer_mask[:, 0].any()
    assert not blockwise.any()  # block_frac 0
    none = train.Batches(train.dataclasses.replace(cfg, full_mask_frac=0.0), shape.vocab, 5)[2]
    assert (none[1].sum(1) == cfg.gen_len).all()
    blocks = train.dataclasses.replace(cfg, full_mask_frac=0.0, block_frac=1.0)
    assert train.Batches(blocks, shape.vocab, 5)[2][3].all()


def test_blockwise_masking_is_what_a_block_decoder_sees(smoke_parts):
    """Rows masked block by block: the answer blocks before one block are clean, that block is
    partly masked, every later block wholly; other rows keep the uniform forward process."""
    _, _, tok, ids = smoke_parts
    input_ids, answer_mask, _ = _batch(tok, ids, gen_len=16)
    blockwise = torch.tensor([True, True, True, False])
    seen = set()
    for seed in range(40):
        uniform = train.mask_answers(
            input_ids, answer_mask, ids.mask, 1e-3, torch.Generator().manual_seed(seed)
        )[1]
        masked = train.mask_answers(
            input_ids, answer_mask, ids.mask, 1e-3, torch.Generator().manual_seed(seed),
            blockwise, block_length=4,
        )[1]  # fmt: skip
        assert torch.equal(masked[3], uniform[3])
        for row in range(3):
            blocks = masked[row][answer_mask[row]].view(4, 4)  # 16 answer tokens, blocks of 4
            full = blocks.all(1)
            first = int((blocks.any(1)).int().argmax()) if blocks.any() else 4
            assert not blocks[:first].any()  # clean before the current block
            assert full[first + 1 :].all()  # wholly masked after it
            seen.add(first)
    assert {0, 1, 2, 3} <= seen  # every block is drawn as the current one (4: none masked)


def test_balanced_end_weights_the_end_of_the_answer_as_a_token(smoke_parts):
    shape, _, tok, ids = smoke_parts
    torch.manual_seed(0)
    model = train.build_model(shape, "cpu")
    input_ids, answer_mask, valid = _batch(tok, ids)
    losses = {
        w: train.diffusion_loss(
            model, input_ids, answer_mask, valid, ids.mask, 1e-3,
            torch.Generator().manual_seed(3), w, ids.eos,
        ).item()
        for w in ("balanced", "balanced_end")
    }  # fmt: skip
    noisy, masked, _ = train.mask_answers(
        input_ids, answer_mask, ids.mask, 1e-3, torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        logp = model(noisy, attn_fn=train.padded_attention(valid)).float().log_softmax(-1)
    total = weights = 0.0
    for b in range(input_ids.shape[0]):
        eos = ((input_ids[b] == ids.eos) & answer_mask[b]).nonzero().flatten().tolist()
        for i in masked[b].nonzero().flatten().tolist():
            padding = input_ids[b, i] == ids.eos and i != eos[0]
            w = 1.0 / (len(eos) - 1) if padding else 1.0
            total += -w * logp[b, i, input_ids[b, i]].item()
            weights += w
    expected = total / weights
    assert abs(losses["balanced_end"] - expected) < 1e-5 * expected
    assert abs(losses["balanced"] - expected) > 1e-4 * expected  # the first EOS counts less there


def test_log_lengths_and_task_weights(smoke_parts):
    """`length_dist="log"`: prompt lengths within the curriculum, half of them below the
    geometric mean of its bounds; `task_weights` pick the long tasks in proportion (a task of
    weight 0 never appears) and leave the short batches alone."""
    shape, cfg, tok, ids = smoke_parts
    cfg = train.dataclasses.replace(
        cfg,
        min_len=64,
        max_len=512,
        gen_len=64,
        curriculum_frac=0.0,
        length_dist="log",
        short_frac=0.0,
        long_tasks=("passkey", "copy", "multi"),
        task_weights=(0.0, 1.0, 3.0),
    )
    rng = train.random.Random(0)
    totals = [train.batch_plan(rng, 10, cfg)[2] + cfg.gen_len + 1 for _ in range(2000)]
    assert 64 <= min(totals) and max(totals) <= 512
    below = sum(t < (64 * 512) ** 0.5 for t in totals) / len(totals)
    assert 0.45 < below < 0.55  # uniform lengths would put 22% there
    batches = [train.Batches(cfg, shape.vocab, seed)[3][0] for seed in range(30)]
    prompts = [tok.decode(row.tolist()) for batch in batches for row in batch]
    multi = sum("List the codes" in p for p in prompts)
    copies = sum("Repeat note" in p for p in prompts)
    assert not any("passkey" in p for p in prompts)
    assert multi + copies == len(prompts) and 1.8 < multi / copies < 5  # weights 3 : 1
    short = train.dataclasses.replace(cfg, short_frac=1.0)
    kinds, weights, _, _ = train.batch_plan(train.random.Random(0), 10, short)
    assert kinds == train.tasks.SHORT_TASKS and weights is None
    for bad in ((1.0, 1.0), (0.0, 0.0, 0.0), (1.0, -1.0, 1.0)):
        with pytest.raises(ValueError, match="task_weights"):
            train.dataclasses.replace(cfg, task_weights=bad).validate(shape)
    with pytest.raises(ValueError, match="length_dist"):
        train.dataclasses.replace(cfg, length_dist="exp").validate(shape)
