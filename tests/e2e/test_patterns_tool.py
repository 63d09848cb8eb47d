"""`python -m sparsed_vllm.patterns`: the patterns it draws are the ones SparseD selects."""

import json

import torch
from sparsed_oracle import SparsedOracle

from sparsed_vllm.patterns import capture_patterns, main
from sparsed_vllm.reference.generate import llada_generate

PROMPT = list(range(20, 120))  # 100 + 32 tokens: 9 tiles of 16, the last one partial


def test_captured_patterns_equal_the_oracle_selection(llada_tiny, llada_mask):
    patterns = capture_patterns(
        llada_tiny, PROMPT, mask_id=llada_mask, gen_length=32, steps=32, block_size=16
    )
    layers = llada_tiny.config.num_hidden_layers
    oracle = SparsedOracle(layers, 32, 32, 0.2, 0.3, 16)
    llada_tiny.attn_fn, default = oracle, llada_tiny.attn_fn
    try:
        llada_generate(
            llada_tiny,
            torch.tensor([PROMPT]),
            steps=32,
            gen_length=32,
            block_length=32,
            mask_id=llada_mask,
        )
    finally:
        llada_tiny.attn_fn = default
    assert sorted(patterns) == list(range(layers))
    for layer, pattern in patterns.items():
        assert torch.equal(pattern.to_dense_mask(), oracle.keep[layer])


def test_command_writes_a_picture_of_every_layer(llada_tiny_dir, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "patterns.png"
    patterns = main(
        [
            "--model",
            str(llada_tiny_dir),
            "--prompt",
            "a short prompt for the tiny model " * 8,
            "--block-size",
            "16",
            "--out",
            str(out),
        ]
    )
    heads = json.loads((llada_tiny_dir / "config.json").read_text())["n_heads"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(out).shape
    # One row of `heads` panels per layer (2.4 x 2.5 inches each, 110 dpi).
    assert (height, width) == (round(2.5 * len(patterns) * 110), round(2.4 * heads * 110))
    assert all(0 < p.kept_fraction() <= 1 for p in patterns.values())
