"""Accuracy of a trained checkpoint through vLLM, dense vs SparseD, at several context lengths.

    python training/eval_sparsed.py --model ckpt/llada-retrieval --lengths 1024 2048 4096

Every request is greedy LLaDA decoding of one `gen_len` canvas (`steps = block_length =
gen_len`). Dense requests send `sparsed: false`; SparseD requests send `sparsed: true` (which
forces it below the plugin's `min_seq_len`) with their `sparsed_skip`, `sparsed_select` and
`sparsed_block_size`. Prints markdown tables (all examples, then each task): exact-match
accuracy per configuration and length, and in brackets the fraction of answers identical to
dense.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import tasks
from tokenizers import Tokenizer
from tqdm import tqdm
from train import TokenIds, encode_example, token_counter
from vllm import LLM, SamplingParams

SKIPS = (0.0, 0.1, 0.2)
SELECTS = (0.1, 0.3, 0.5)


def sampling_params(gen_len: int, sparsed: dict | None) -> SamplingParams:
    """Greedy one-block LLaDA; `sparsed` = None for dense, else skip/select/block_size."""
    extra: dict = {"steps": gen_len, "block_length": gen_len, "sparsed": sparsed is not None}
    if sparsed is not None:
        extra.update({f"sparsed_{k}": v for k, v in sparsed.items()})
    return SamplingParams(max_tokens=gen_len, temperature=0, extra_args=extra)


def configurations(block_size: int) -> list[tuple[str, dict | None]]:
    """(label, SparseD overrides) for dense and the skip x select grid."""
    grid = [
        (f"SparseD skip={s} select={k}", {"skip": s, "select": k, "block_size": block_size})
        for s, k in itertools.product(SKIPS, SELECTS)
    ]
    return [("dense", None), *grid]


def markdown_table(lengths: list[int], rows: dict[str, dict[int, dict]], kind: str = "all") -> str:
    """Accuracy of `kind` ("all" = every example) per configuration and length, and in
    brackets the fraction of answers identical to dense."""
    header = "| config | " + " | ".join(f"{n} tokens" for n in lengths) + " |"
    lines = [header, "|---|" + "---|" * len(lengths)]
    for label, by_length in rows.items():
        cells = []
        for n in lengths:
            accuracy, agreement = by_length[n][kind]
            cells.append(f"{accuracy:.3f} ({agreement:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score(texts: list[str], dense: list[str], examples: list) -> dict[str, tuple[float, float]]:
    """{kind or "all": (exact-match accuracy, fraction identical to dense)}."""
    groups: dict[str, list[int]] = {"all": list(range(len(examples)))}
    for i, example in enumerate(examples):
        groups.setdefault(example.kind, []).append(i)
    return {
        kind: (
            sum(tasks.is_correct(texts[i], examples[i]) for i in idx) / len(idx),
            sum(texts[i] == dense[i] for i in idx) / len(idx),
        )
        for kind, idx in groups.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--n", type=int, default=100, help="examples per task and length")
    parser.add_argument("--kinds", nargs="+", default=list(tasks.LONG_TASKS))
    parser.add_argument("--gen-len", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128, help="SparseD tile size")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--json-out", default=None, help="also write the results here")
    parser.add_argument(
        "--batch-tokens", type=int, default=65536, help="tokens per engine step (all requests)"
    )
    parser.add_argument(
        "--gpu-bundle",
        action="store_true",
        help="engine options for scripts/gpu_vllm_run.sh (torch ops, not vLLM compiled ones)",
    )
    args = parser.parse_args()

    model = Path(args.model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    ids = TokenIds.for_vocab(vocab)
    max_model_len = max(args.lengths) + 2 * args.gen_len + 64
    extra_engine = {}
    if args.gpu_bundle:
        extra_engine = {"compilation_config": {"custom_ops": ["none"]}}
        extra_engine["gpu_memory_utilization"] = 0.5
    llm = LLM(
        model=str(model),
        dtype=args.dtype,
        max_model_len=max_model_len,
        max_num_batched_tokens=max(args.batch_tokens, 2 * max_model_len),
        max_num_seqs=256,
        enforce_eager=True,
        seed=0,
        **extra_engine,
    )
    rows: dict[str, dict[int, dict]] = {}
    configs = configurations(args.block_size)
    progress = tqdm(total=len(args.lengths) * len(configs), desc="configurations", unit="config")
    for length in args.lengths:
        examples = tasks.make_examples(
            args.n * len(args.kinds), args.seed + length, length, args.kinds, token_counter(tok)
        )
        prompts = [
            {"prompt_token_ids": encode_example(tok, e, ids, args.gen_len)[0]} for e in examples
        ]
        dense: list[str] = []
        for label, sparsed in configs:
            outputs = llm.generate(prompts, sampling_params(args.gen_len, sparsed), use_tqdm=False)
            texts = [o.outputs[0].text for o in outputs]
            dense = dense or texts
            scores = score(texts, dense, examples)
            rows.setdefault(label, {})[length] = scores
            progress.update()
            tqdm.write(
                f"{length} tokens, {label}: "
                + ", ".join(
                    f"{kind} {acc:.3f} ({agree:.2f})" for kind, (acc, agree) in scores.items()
                )
            )
            if args.json_out:  # after every configuration, so a cut-short run keeps its part
                Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    for kind in ["all", *args.kinds]:
        print(f"\n{kind}: accuracy (same answer as dense)\n")
        print(markdown_table(args.lengths, rows, kind))


if __name__ == "__main__":
    main()
