"""Draw the SparseD patterns a checkpoint selects for a prompt: kept tiles per layer and head.

    python -m sparsed_vllm.patterns --model checkpoints/llada-long \\
        --prompt-file docs/passkey_prompt.txt --out docs/patterns.png

Runs the checkpoint's plain PyTorch model (`sparsed_vllm.reference`) through its published
decoding loop (dense attention) and, at the request's selection step `int(steps * skip) + 1`,
selects each layer's pattern from that step's post-RoPE Q and K exactly as the engine does
(`core.pattern.select_pattern`). The picture has one heat map per (layer, head): query tiles down,
key tiles across, kept tiles dark; the dashed lines mark the first tile of the generated canvas
(tiles from there on are ranked by their own softmax, "isolated" selection); each title gives the
head's kept fraction. Needs matplotlib (`pip install sparsed-vllm[plot]`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsed_vllm.core.pattern import TilePattern, default_scale, generation_start_tile
from sparsed_vllm.core.pattern import select_pattern as select_tiles
from sparsed_vllm.reference.generate import dream_generate, llada_generate
from sparsed_vllm.reference.models import DreamModel, load_reference_model, sdpa_attention


class _SelectAt:
    """Attention function that is dense and, at forward number `step`, selects every layer's
    pattern from its post-RoPE q, k (one forward per denoising step, layers in order)."""

    def __init__(self, num_layers: int, step: int, gen_length: int, block_size: int, select: float):
        self.num_layers, self.step = num_layers, step
        self.gen_length, self.block_size, self.select = gen_length, block_size, select
        self.calls = 0
        self.patterns: dict[int, TilePattern] = {}

    def __call__(self, q, k, v):
        step, layer = divmod(self.calls, self.num_layers)
        self.calls += 1
        if step == self.step:
            qs, ks = q[0].transpose(0, 1), k[0].transpose(0, 1)  # [L, H, D]
            self.patterns[layer] = select_tiles(
                qs, ks, self.gen_length, self.block_size, self.select, default_scale(q.shape[-1])
            )
        return sdpa_attention(q, k, v)


@torch.no_grad()
def capture_patterns(
    model,
    prompt_ids: list[int],
    *,
    mask_id: int,
    gen_length: int,
    steps: int,
    skip: float = 0.2,
    select: float = 0.3,
    block_size: int = 128,
) -> dict[int, TilePattern]:
    """Per layer, the pattern selected at step `int(steps * skip) + 1` of greedy decoding
    (LLaDA: one block of `gen_length`; Dream: its single canvas)."""
    switch = int(steps * skip) + 1
    if switch >= steps:
        raise ValueError(f"skip {skip} with {steps} steps never reaches a selection step")
    hook = _SelectAt(model.config.num_hidden_layers, switch, gen_length, block_size, select)
    model.attn_fn, default = hook, model.attn_fn
    try:
        prompt = torch.tensor([prompt_ids])
        if isinstance(model, DreamModel):
            dream_generate(
                model,
                prompt,
                max_new_tokens=gen_length,
                steps=steps,
                mask_id=mask_id,
                alg="entropy",
            )
        else:
            llada_generate(
                model,
                prompt,
                steps=steps,
                gen_length=gen_length,
                block_length=gen_length,
                mask_id=mask_id,
            )
    finally:
        model.attn_fn = default
    return hook.patterns


def draw(
    patterns: dict[int, TilePattern], layers: list[int], heads: int, gen_length: int, out: Path
) -> None:
    """One heat map per (layer, head); rows are layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = patterns[layers[0]]
    heads = min(heads, first.kv_indices.shape[0])
    g = generation_start_tile(first.seq_len, gen_length, first.block_size)
    fig, axes = plt.subplots(
        len(layers), heads, figsize=(2.4 * heads, 2.5 * len(layers)), squeeze=False
    )
    for row, layer in enumerate(layers):
        mask = patterns[layer].to_dense_mask().float()  # [Hq, nq, nb]
        for head in range(heads):
            ax = axes[row][head]
            ax.imshow(mask[head], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            for line in (ax.axhline, ax.axvline):
                line(g - 0.5, color="tab:red", linestyle="--", linewidth=0.8)
            ax.set_title(f"layer {layer} head {head}: {mask[head].mean():.0%}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"SparseD kept tiles ({first.seq_len} tokens, tiles of {first.block_size}; "
        "rows: query tiles, columns: key tiles; dashed: start of the canvas)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _prompt_ids(model_dir: Path, args) -> list[int]:
    from tokenizers import Tokenizer

    text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = json.loads((model_dir / "config.json").read_text()).get("bos_token_id")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([bos] if bos is not None else []) + ids


def main(argv: list[str] | None = None) -> dict[int, TilePattern]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (LLaDA or Dream)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompt-file")
    parser.add_argument("--gen", type=int, default=32, help="canvas length")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--skip", type=float, default=0.2)
    parser.add_argument("--select", type=float, default=0.3)
    parser.add_argument("--block-size", type=int, default=128, help="SparseD tile size")
    parser.add_argument("--layers", default=None, help="comma-separated (default: all)")
    parser.add_argument("--heads", type=int, default=8, help="at most this many heads per layer")
    parser.add_argument("--out", default="patterns.png")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    model = load_reference_model(model_dir)
    mask_id = json.loads((model_dir / "config.json").read_text())["mask_token_id"]
    prompt = _prompt_ids(model_dir, args)
    patterns = capture_patterns(
        model,
        prompt,
        mask_id=mask_id,
        gen_length=args.gen,
        steps=args.steps,
        skip=args.skip,
        select=args.select,
        block_size=args.block_size,
    )
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted(patterns)
    draw(patterns, layers, args.heads, args.gen, Path(args.out))
    kept = {layer: round(patterns[layer].kept_fraction(), 3) for layer in layers}
    print(f"{len(prompt) + args.gen} tokens; kept fraction by layer {kept}; wrote {args.out}")
    return patterns


if __name__ == "__main__":
    main()
