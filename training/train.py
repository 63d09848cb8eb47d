"""Train a small LLaDA-format masked-diffusion LM on the synthetic tasks of `tasks.py`.

    python training/train.py --preset h100 --device cuda --out ckpt/llada-retrieval
    python training/train.py --preset smoke --out /tmp/llada-smoke          # CPU, seconds

Objective: every answer token (the answer, then EOS up to `gen_len`) is masked with probability
t ~ U(eps, 1), drawn per sequence; the prompt stays clean except in a `full_mask_frac` share of
sequences (LLaDA's pretraining objective). The loss is set by `weighting` (see `diffusion_loss`:
LLaDA's SFT weighting, or `balanced`, which the `h100` preset uses; `balanced_end`). A
`block_frac` share of sequences can instead be masked block by block, as a semi-autoregressive
decoder sees its canvas (`mask_answers`). Sequences in a batch share
one sampled context length (a curriculum grows it to `--max-len`) and are right-padded; padding
is masked out of attention as keys.

The output directory is a LLaDA checkpoint in the project's layout (config.json, generation
config, tokenizer from `sparsed_vllm.checkpoint`) with weights saved by the real tensor names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tasks
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from sparsed_vllm.checkpoint import Shape, generation_config, llada_config
from sparsed_vllm.configs import LLaDAConfig
from sparsed_vllm.reference.generate import llada_generate
from sparsed_vllm.reference.models import LLaDAModel
from sparsed_vllm.tokenizer_builder import build_tokenizer, special_token_ids, write_tokenizer

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data settings of a preset (command-line flags override some)."""

    steps: int
    batch_tokens: int
    lr: float
    min_len: int
    max_len: int
    gen_len: int = 16
    warmup: int = 100
    weight_decay: float = 0.1
    eps: float = 1e-3
    short_frac: float = 0.15
    # Fraction of sequences trained with the pretraining objective instead (every token but BOS
    # may be masked): copies of masked tokens elsewhere in the sequence (the needle and the
    # answer, a key in the context and in the question) teach retrieval from many more tokens.
    full_mask_frac: float = 0.0
    weighting: str = "elbo"  # see diffusion_loss
    # Share of sequences masked the way semi-autoregressive decoding sees a canvas in blocks of
    # `block_length`: earlier blocks clean, one block masked with probability t, later blocks
    # wholly masked (`mask_answers`). 0 keeps the uniform forward process everywhere.
    block_frac: float = 0.0
    block_length: int = 32
    curriculum_frac: float = 0.6
    # Context length of a long batch: "uniform" in [min_len, curriculum max] tokens, or "log"
    # (log-uniform: as many batches from 512 to 2k as from 8k to 32k; a short batch holds many
    # more examples, so tasks whose difficulty is the answer, not the distance, see more of them).
    length_dist: str = "uniform"
    eval_every: int = 500
    eval_examples: int = 24
    # Tasks of the long-context batches (the short batches use tasks.SHORT_TASKS).
    long_tasks: tuple[str, ...] = tasks.LONG_TASKS
    # Relative frequencies of `long_tasks` in the long batches (None: equally often).
    task_weights: tuple[float, ...] | None = None

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        return self.long_tasks + tasks.SHORT_TASKS

    def validate(self, shape: Shape) -> None:
        """Raise ValueError naming the offending value."""
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if not 0 < self.min_len <= self.max_len:
            raise ValueError(f"need 0 < min_len {self.min_len} <= max_len {self.max_len}")
        if self.max_len > shape.max_len:
            raise ValueError(f"max_len {self.max_len} exceeds the model length {shape.max_len}")
        if self.batch_tokens < self.max_len:
            raise ValueError(f"batch_tokens {self.batch_tokens} < max_len {self.max_len}")
        if self.length_dist not in ("uniform", "log"):
            raise ValueError(f"length_dist must be 'uniform' or 'log', got {self.length_dist!r}")
        weights = self.task_weights
        if weights is not None and (
            len(weights) != len(self.long_tasks) or min(weights) < 0 or not sum(weights)
        ):
            raise ValueError(
                f"task_weights {weights} must give one weight >= 0 per task of {self.long_tasks}"
            )


PRESETS: dict[str, tuple[Shape, TrainConfig]] = {
    "smoke": (
        Shape(layers=2, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=512, max_len=512),
        TrainConfig(
            steps=20,
            batch_tokens=1024,
            lr=2e-3,
            min_len=48,
            max_len=160,
            warmup=4,
            eval_every=0,
            eval_examples=4,
            weighting="balanced",
            full_mask_frac=0.25,
        ),
    ),
    # About 5.6M parameters (11 MB in bfloat16); head_dim 64, which the GPU kernels support.
    "h100": (
        Shape(
            layers=6, hidden=256, heads=4, kv_heads=4, intermediate=768, vocab=1024, max_len=8192
        ),
        TrainConfig(
            steps=5000,
            batch_tokens=65536,
            lr=1.5e-3,
            min_len=64,
            max_len=4096,
            gen_len=8,
            warmup=200,
            curriculum_frac=0.5,
            weighting="balanced",
            full_mask_frac=0.25,
            eval_every=1000,
        ),
    ),
    # The h100 shape at 32k positions, continued from a checkpoint of it (`--init`): long
    # contexts (2k-32k) and answers over two blocks of 32 tokens in a canvas of 64.
    "long": (
        Shape(
            layers=6, hidden=256, heads=4, kv_heads=4, intermediate=768, vocab=1024, max_len=32768
        ),
        TrainConfig(
            steps=4000,
            batch_tokens=65536,
            lr=6e-4,
            min_len=2048,
            max_len=32768,
            gen_len=64,
            warmup=50,
            short_frac=0.05,
            curriculum_frac=0.5,
            weighting="balanced",
            full_mask_frac=0.25,
            eval_every=0,
            eval_examples=36,
            long_tasks=("passkey", "copy") + tasks.BLOCK_TASKS,
        ),
    ),
}

# `long`, continued from its checkpoint, aimed at answers over two blocks. `long` did not learn
# `copy_long` or `multi`: at 2k-32k tokens a batch holds 2-32 examples, so its 2229 steps showed
# the model a few thousand of them. Here contexts are log-uniform from 512 tokens (half the
# batches at <= 4k, 16-128 examples each) and the block tasks are drawn 5 times in 7; a quarter
# of the sequences are masked block by block, as they are served, and the EOS that ends an
# answer weighs one token (its copy answers, decoded in blocks, often missed their end). Run
# once for 7 minutes on an H200: no task changed (training/README.md).
PRESETS["long-blocks"] = (
    PRESETS["long"][0],
    dataclasses.replace(
        PRESETS["long"][1],
        min_len=512,
        curriculum_frac=0.0,
        length_dist="log",
        task_weights=(1.0, 1.0, 3.0, 2.0),
        weighting="balanced_end",
        block_frac=0.25,
        block_length=32,
    ),
)

# `long-blocks` with `copy_long` redefined as a passage of distinct words (`tasks.copy_long`) and
# drawn 4 times in 7. Run once for 5.5 minutes on an H200: `copy_long` still 0%, the model copies
# the first five words of each passage, then repeats one (training/README.md).
PRESETS["long-distinct"] = (
    PRESETS["long"][0],
    dataclasses.replace(PRESETS["long-blocks"][1], task_weights=(1.0, 1.0, 4.0, 1.0)),
)


@dataclasses.dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    mask: int

    @classmethod
    def for_vocab(cls, vocab: int) -> TokenIds:
        ids = special_token_ids("llada", vocab)
        return cls(bos=ids["bos"], eos=ids["eos"], mask=ids["mask"])


def token_counter(tok: Tokenizer):
    """`count(text)` with the model's tokenizer, for the task generators."""
    return lambda text: len(tok.encode(text).ids)


def encode_example(
    tok: Tokenizer, example: tasks.Example, ids: TokenIds, gen_len: int
) -> tuple[list[int], list[int]]:
    """(prompt ids = BOS + prompt, canvas ids = ` answer` + EOS padding to `gen_len`)."""
    answer = tok.encode(" " + example.answer).ids
    if len(answer) >= gen_len:
        raise ValueError(f"answer {example.answer!r} is {len(answer)} tokens; gen_len {gen_len}")
    return [ids.bos, *tok.encode(example.prompt).ids], answer + [ids.eos] * (gen_len - len(answer))


def collate(
    pairs: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest. -> input_ids, answer_mask, valid: [B, L] (long, bool, bool)."""
    length = max(len(p) + len(a) for p, a in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    answer_mask = torch.zeros(len(pairs), length, dtype=torch.bool)
    valid = torch.zeros(len(pairs), length, dtype=torch.bool)
    for i, (prompt, answer) in enumerate(pairs):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        answer_mask[i, len(prompt) : n] = True
        valid[i, :n] = True
    return input_ids, answer_mask, valid


def mask_answers(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    mask_id: int,
    eps: float,
    generator: torch.Generator | None = None,
    blockwise: torch.Tensor | None = None,
    block_length: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process on answer tokens only. [B, L] -> noisy [B, L], masked [B, L], t [B].

    Rows flagged in `blockwise` [B] are masked as semi-autoregressive decoding sees them: the
    answer span in blocks of `block_length`, one block drawn uniformly, blocks before it clean,
    it masked with probability t, blocks after it wholly masked."""
    b, n = input_ids.shape
    u = torch.rand(b, generator=generator, device=input_ids.device)
    t = (1 - eps) * u + eps  # [B]
    draw = torch.rand(b, n, generator=generator, device=input_ids.device)
    masked = (draw < t[:, None]) & answer_mask
    if blockwise is not None and bool(blockwise.any()):
        block = (answer_mask.cumsum(1) - 1) // block_length  # [B, L] block of each answer token
        n_blocks = (answer_mask.sum(1) + block_length - 1) // block_length  # [B]
        pick = torch.rand(b, generator=generator, device=input_ids.device)
        current = (pick * n_blocks).floor().long()[:, None]  # [B, 1]
        staged = answer_mask & ((block > current) | ((block == current) & (draw < t[:, None])))
        masked = torch.where(blockwise[:, None], staged, masked)
    return torch.where(masked, mask_id, input_ids), masked, t


def padded_attention(valid: torch.Tensor):
    """Bidirectional attention that ignores padding keys. valid: [B, L] bool."""
    keep = valid[:, None, None, :]  # [B, 1, 1, L]

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    return attn


def diffusion_loss(
    model: LLaDAModel,
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    valid: torch.Tensor,
    mask_id: int,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    weighting: str = "elbo",
    eos_id: int | None = None,
    blockwise: torch.Tensor | None = None,
    block_length: int = 32,
) -> torch.Tensor:
    """Masked-diffusion loss on the masked answer tokens.

    `elbo` (LLaDA SFT): per sequence, the sum of CE / t over masked tokens divided by the answer
    length, averaged over the batch. `balanced`: the mean CE over the masked tokens of the batch
    (no 1/t), where the EOS padding of a canvas counts, all together, as one token (`eos_id`
    needed). Measured on the echo task (small models, 64 examples a step): weighting every EOS
    like an answer token, no copying after 500-800 steps; `balanced`, copying after about 150.
    `balanced_end`: the same, but a canvas's first EOS (where the answer ends, the decision a
    block decoder must make before the later blocks exist) weighs one token, and the rest of the
    padding one token together. `blockwise`/`block_length`: see `mask_answers`."""
    noisy, masked, t = mask_answers(
        input_ids, answer_mask, mask_id, eps, generator, blockwise, block_length
    )
    hidden = model.forward_hidden(noisy, attn_fn=padded_attention(valid))  # [B, L, D]
    # Logits only where the loss is taken: the LM head over all positions dominates memory.
    logits = model.compute_logits(hidden[masked]).float()  # [M, V]
    ce = F.cross_entropy(logits, input_ids[masked], reduction="none")  # [M]
    if weighting in ("balanced", "balanced_end"):
        if eos_id is None:
            raise ValueError(f"weighting {weighting!r} needs eos_id")
        eos = (input_ids == eos_id) & answer_mask  # [B, L]
        end = torch.zeros_like(eos)
        if weighting == "balanced_end":
            end[:, 1:] = eos[:, 1:] & ~eos[:, :-1]
        padding = eos & ~end
        per_row = 1.0 / padding.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
        weight = torch.where(padding, per_row, 1.0)[masked]  # [M]
        return (ce * weight).sum() / weight.sum().clamp(min=1e-6)
    if weighting != "elbo":
        raise ValueError(
            f"weighting must be 'elbo', 'balanced' or 'balanced_end', got {weighting!r}"
        )
    row_weight = 1.0 / (t * answer_mask.sum(1))  # [B]
    weight = row_weight[:, None].expand_as(masked)[masked]  # [M]
    return (ce * weight).sum() / input_ids.shape[0]


def init_weights(model: LLaDAModel, std: float = 0.02) -> None:
    """Normal(0, std) for matrices, residual outputs scaled by 1/sqrt(2 * layers); norms at 1."""
    n_layers = model.config.n_layers
    for name, param in model.named_parameters():
        if param.dim() < 2:
            torch.nn.init.ones_(param)
            continue
        residual_out = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
        scale = 1 / math.sqrt(2 * n_layers) if residual_out else 1.0
        torch.nn.init.normal_(param, std=std * scale)


def build_model(shape: Shape, device: str) -> LLaDAModel:
    cfg = LLaDAConfig.from_dict(llada_config(shape))
    model = LLaDAModel(cfg)
    init_weights(model)
    return model.to(device)


def current_max_len(step: int, cfg: TrainConfig) -> int:
    """Curriculum: the longest context grows linearly to `max_len` over `curriculum_frac`."""
    ramp = max(1, int(cfg.steps * cfg.curriculum_frac))
    frac = min(1.0, step / ramp)
    return int(cfg.min_len + frac * (cfg.max_len - cfg.min_len))


def batch_plan(
    rng: random.Random, step: int, cfg: TrainConfig
) -> tuple[tuple[str, ...], tuple[float, ...] | None, int, int]:
    """What batch `step` holds: all-short tasks with probability `short_frac`, else long tasks
    at one prompt length (`length_dist`). -> (tasks, their weights or None, prompt length in
    tokens, number of examples)."""
    if rng.random() < cfg.short_frac:
        return tasks.SHORT_TASKS, None, 0, max(1, cfg.batch_tokens // 64)
    longest = current_max_len(step, cfg)
    if cfg.length_dist == "log":
        total = round(math.exp(rng.uniform(math.log(cfg.min_len), math.log(longest))))
    else:
        total = rng.randint(cfg.min_len, longest)
    length = total - cfg.gen_len - 1
    size = max(1, cfg.batch_tokens // (length + cfg.gen_len + 8))
    return cfg.long_tasks, cfg.task_weights, length, size


def sample_batch(
    rng: random.Random, step: int, cfg: TrainConfig, tok: Tokenizer, ids: TokenIds, count
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch `step` of `batch_plan`.
    -> input_ids, answer_mask, valid [B, L], and blockwise [B] (rows masked block by block)."""
    kinds, weights, length, size = batch_plan(rng, step, cfg)

    def kind() -> str:  # unweighted: rng.choice, so the presets without weights keep their data
        return rng.choices(kinds, weights)[0] if weights else rng.choice(kinds)

    examples = [tasks.make_example(kind(), rng, max(8, length), count) for _ in range(size)]
    input_ids, answer_mask, valid = collate(
        [encode_example(tok, e, ids, cfg.gen_len) for e in examples], ids.eos
    )
    full = torch.tensor([rng.random() < cfg.full_mask_frac for _ in examples])
    answer_mask[full] = valid[full]
    answer_mask[:, 0] = False  # BOS is never masked
    blockwise = torch.zeros(len(examples), dtype=torch.bool)
    if cfg.block_frac:  # drawn only then: the other presets keep their batches
        blockwise = torch.tensor([rng.random() < cfg.block_frac for _ in examples]) & ~full
    return input_ids, answer_mask, valid, blockwise


class Batches(torch.utils.data.Dataset):
    """Batch `step` of a run, generated from its own seed: the same batches for any number of
    loader workers (the generator is pure Python and the GPU would otherwise wait on it)."""

    def __init__(self, cfg: TrainConfig, vocab: int, seed: int):
        self.cfg, self.vocab, self.seed = cfg, vocab, seed
        self._tok: Tokenizer | None = None

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        if self._tok is None:  # built in the worker, not pickled into it
            self._tok = build_tokenizer("llada", self.vocab)
        rng = random.Random(self.seed * 1_000_003 + step)
        ids, count = TokenIds.for_vocab(self.vocab), token_counter(self._tok)
        return sample_batch(rng, step, self.cfg, self._tok, ids, count)


@torch.no_grad()
def greedy_answer(
    model: LLaDAModel,
    tok: Tokenizer,
    prompt: list[int],
    ids: TokenIds,
    gen_len: int,
    block_length: int | None = None,
) -> str:
    """Greedy LLaDA decoding of one canvas of `gen_len`, one token per step, in blocks of
    `block_length` (default: one block)."""
    x = torch.tensor([prompt], device=next(model.parameters()).device)
    block = block_length or gen_len
    out = llada_generate(
        model, x, steps=gen_len, gen_length=gen_len, block_length=block, mask_id=ids.mask
    )[0, len(prompt) :].tolist()
    if ids.eos in out:
        out = out[: out.index(ids.eos)]
    return tok.decode(out)


def evaluate(
    model: LLaDAModel,
    tok: Tokenizer,
    ids: TokenIds,
    cfg: TrainConfig,
    length: int,
    n: int,
    seed: int,
    device: str,
) -> dict[str, float]:
    """Greedy exact-match accuracy per task kind at prompt length `length`."""
    model.eval()
    examples = tasks.make_examples(n, seed, length, cfg.eval_tasks, token_counter(tok))
    hits: dict[str, list[bool]] = {}
    with _autocast(device):
        for example in examples:
            prompt, _ = encode_example(tok, example, ids, cfg.gen_len)
            # Presets trained block by block are evaluated in blocks, as they will be served.
            block = cfg.block_length if cfg.block_frac else None
            prediction = greedy_answer(model, tok, prompt, ids, cfg.gen_len, block)
            hits.setdefault(example.kind, []).append(tasks.is_correct(prediction, example))
    model.train()
    return {kind: sum(h) / len(h) for kind, h in hits.items()}


def _autocast(device: str):
    """bfloat16 autocast on CUDA; a no-op elsewhere (CPU smoke runs stay in fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def lr_scale(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over `cfg.warmup` steps, then cosine from 1 to 0.1 as `progress` goes 0->1."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(
    model: LLaDAModel, shape: Shape, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write config.json, generation_config.json, tokenizer files and model.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (
        ("config.json", llada_config(shape)),
        ("generation_config.json", generation_config("llada", shape)),
    ):
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    write_tokenizer(out, "llada", shape.vocab, shape.max_len)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def train(
    shape: Shape,
    cfg: TrainConfig,
    device: str,
    seed: int,
    log_every: int = 50,
    workers: int = 0,
    time_limit: float | None = None,
    init: str | Path | None = None,
):
    """Run the training loop; returns (model in train mode, tokenizer, steps run).

    With `time_limit` (seconds) the learning-rate schedule follows max(step / steps, elapsed /
    time_limit), so the decay completes within the time given on any card, and training stops
    after the step that crosses it; the data (and its length curriculum) depend on the step
    only. Without it the run is a pure function of the seed."""
    cfg.validate(shape)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    tok = build_tokenizer("llada", shape.vocab)
    ids = TokenIds.for_vocab(shape.vocab)
    model = build_model(shape, device).train()
    if init is not None:  # continue from a checkpoint of the same shape (weights only)
        model.load_state_dict(LLaDAModel.from_pretrained(init).state_dict())
        model.float()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    loader = torch.utils.data.DataLoader(
        Batches(cfg, shape.vocab, seed),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=8 if workers else None,
        pin_memory=device.startswith("cuda"),
        persistent_workers=False,
    )
    start = time.perf_counter()
    steps_run = 0
    bar = tqdm(total=cfg.steps, desc="training", unit="step", mininterval=5)
    for step, cpu_batch in enumerate(loader):
        elapsed = time.perf_counter() - start
        progress = step / cfg.steps
        if time_limit is not None:
            progress = max(progress, elapsed / time_limit)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_scale(cfg, step, progress)
        batch = [t.to(device, non_blocking=True) for t in cpu_batch]
        input_ids, answer_mask, valid, blockwise = batch
        with _autocast(device):
            loss = diffusion_loss(
                *(model, input_ids, answer_mask, valid, ids.mask, cfg.eps, generator),
                *(cfg.weighting, ids.eos, blockwise, cfg.block_length),
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps_run = step + 1
        bar.update()
        if step % log_every == 0 or step == cfg.steps - 1:
            shape_str = "x".join(map(str, input_ids.shape))
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", batch=shape_str)
            tqdm.write(
                f"step {step:5d} loss {loss.item():.4f} lr {lr:.2e} batch {shape_str} "
                f"{elapsed:.0f}s"
            )
        if cfg.eval_every and step and step % cfg.eval_every == 0:
            acc = evaluate(model, tok, ids, cfg, current_max_len(step, cfg) - 32, 12, step, device)
            tqdm.write(f"step {step:5d} greedy accuracy {acc}")
        if time_limit is not None and time.perf_counter() - start > time_limit:
            tqdm.write(f"time limit {time_limit:.0f}s reached after {steps_run} steps")
            break
    bar.close()
    return model, tok, steps_run


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=None, help="longest training sequence")
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="bfloat16")
    parser.add_argument("--eval-lengths", type=int, nargs="*", default=None)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--workers", type=int, default=None, help="batch-generating processes (default: CUDA 8)"
    )
    parser.add_argument("--init", default=None, help="start from this checkpoint's weights")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="stop after this many seconds of training"
    )
    return parser.parse_args(argv)


def _init_record(init: str | None) -> dict | None:
    """The training record of the checkpoint a run continued from (stages chain)."""
    if init is None or not (Path(init) / "training_record.json").exists():
        return None
    return json.loads((Path(init) / "training_record.json").read_text())


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    shape, cfg = PRESETS[args.preset]
    overrides = {"steps": args.steps, "max_len": args.max_len, "lr": args.lr}
    overrides["batch_tokens"] = args.batch_tokens
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.min_len > cfg.max_len:
        cfg = dataclasses.replace(cfg, min_len=cfg.max_len)
    workers = args.workers if args.workers is not None else (8 if args.device != "cpu" else 0)
    start = time.perf_counter()
    model, tok, steps_run = train(
        shape, cfg, args.device, args.seed, args.log_every, workers, args.time_limit, args.init
    )
    train_seconds = time.perf_counter() - start
    # Written before the final evaluation so that a run cut short still leaves its checkpoint.
    out = save_checkpoint(model, shape, args.out, SAVE_DTYPES[args.save_dtype])
    print(f"wrote {out}")
    ids = TokenIds.for_vocab(shape.vocab)
    final = {}
    for length in args.eval_lengths or [cfg.min_len, cfg.max_len - cfg.gen_len - 1]:
        acc = evaluate(model, tok, ids, cfg, length, cfg.eval_examples, 10_000, args.device)
        final[length] = {"mean": sum(acc.values()) / len(acc), **acc}
        print(f"final greedy accuracy at {length} tokens: {final[length]['mean']:.3f} {acc}")
    record = {
        "command": "python training/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset,
        "seed": args.seed,
        "steps_planned": cfg.steps,
        "steps_run": steps_run,
        "time_limit": args.time_limit,
        "init": args.init,
        "init_record": _init_record(args.init),
        "train_seconds": round(train_seconds, 1),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "shape": dataclasses.asdict(shape),
        "train_config": dataclasses.asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "save_dtype": args.save_dtype,
        "reference_greedy_accuracy": final,
    }
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
