"""The quality suite: accuracy of a trained checkpoint through vLLM in every decoding mode.

    python training/eval_sparsed.py --model ckpt/llada-retrieval --lengths 1024 2048 4096

Every request is greedy LLaDA decoding of a `gen_len` canvas in blocks of `--block-length` with
`--steps` steps (both default to gen_len: one block, one token per step). Modes
(`configurations`): the published dense decoding (`sparsed: false`), the SparseD skip x select
grid (`sparsed: true`, which forces it below the plugin's `min_seq_len`), the prefix and dual KV
caches, threshold 0.9 and 0.7, dual + threshold, and dual + threshold + SparseD's defaults. A mode
the engine's attention backend cannot run is reported as such. Prints markdown tables (all
examples, then each task): exact-match accuracy per configuration and length, in brackets the
fraction of answers identical to dense, and the tokens committed per denoising step where the
mode makes it vary (the engine runs in this process, so its statistics are read directly).
`--configs` runs a subset (dense is always first: agreement is measured against it), and
`--runner` passes runner settings to the engine, e.g. `'{"sparse_kernel": "fa4"}'`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import tasks
from tokenizers import Tokenizer
from tqdm import tqdm
from train import TokenIds, encode_example, token_counter
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

from sparsed_vllm.core.sparsed import SparsedConfig

SKIPS = (0.0, 0.1, 0.2)
SELECTS = (0.1, 0.3, 0.5)


def sparsed_extra(skip: float, select: float, block_size: int) -> dict:
    """extra_args forcing SparseD on (even below the plugin's min_seq_len) with these settings."""
    return {
        "sparsed": True,
        "sparsed_skip": skip,
        "sparsed_select": select,
        "sparsed_block_size": block_size,
    }


def mode_params(gen_len: int, extra: dict, steps: int, block_length: int) -> SamplingParams:
    """Greedy decoding of a `gen_len` canvas with `extra` (mode options) over the base schedule."""
    extra = {"steps": steps, "block_length": block_length, **extra}
    return SamplingParams(max_tokens=gen_len, temperature=0, extra_args=extra)


def configurations(block_size: int) -> list[tuple[str, dict]]:
    """(label, extra_args) of every mode: the published dense decoding, the SparseD skip x
    select grid, each cache, threshold and factor decoding, and the cache with threshold
    decoding and SparseD's defaults stacked."""
    dense = {"sparsed": False}
    grid = [
        (f"SparseD skip={s} select={k}", sparsed_extra(s, k, block_size))
        for s, k in itertools.product(SKIPS, SELECTS)
    ]
    defaults = SparsedConfig()
    stacked = {
        "cache": "dual",
        "threshold": 0.9,
        **sparsed_extra(defaults.skip, defaults.select, block_size),
    }
    return [
        ("dense", dense),
        *grid,
        ("prefix cache", {**dense, "cache": "prefix"}),
        ("dual cache", {**dense, "cache": "dual"}),
        ("threshold 0.9", {**dense, "threshold": 0.9}),
        ("threshold 0.7", {**dense, "threshold": 0.7}),
        ("factor 1.0", {**dense, "factor": 1.0}),
        ("dual + factor 1.0", {**dense, "cache": "dual", "factor": 1.0}),
        ("dual + threshold 0.9", {**dense, "cache": "dual", "threshold": 0.9}),
        ("dual + threshold 0.9 + SparseD defaults", stacked),
    ]


def markdown_table(lengths: list[int], rows: dict[str, dict[int, dict]], kind: str = "all") -> str:
    """Accuracy of `kind` ("all" = every example) per configuration and length, in brackets the
    fraction of answers identical to dense, and the tokens per step when not one."""
    header = "| config | " + " | ".join(f"{n} tokens" for n in lengths) + " |"
    lines = [header, "|---|" + "---|" * len(lengths)]
    for label, by_length in rows.items():
        cells = []
        for n in lengths:
            result = by_length[n]
            if "refused" in result:
                cells.append("not run on this backend")
                continue
            accuracy, agreement = result[kind]
            per_step = result["tokens_per_step"]
            extra = f", {per_step:.1f} tok/step" if abs(per_step - 1) > 1e-9 else ""
            cells.append(f"{accuracy:.3f} ({agreement:.2f}{extra})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_mode(llm, prompts, params, examples, dense: list[str]) -> dict:
    """Scores of one mode ({kind: (accuracy, agreement)}, tokens_per_step, and `texts` for the
    first, dense mode), or {"refused": message} if the engine's backend cannot run it."""
    stats = llm.llm_engine.engine_core.engine_core.scheduler.stats.tokens_per_step
    before = stats.total, stats.count
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    except VLLMValidationError as exc:
        return {"refused": str(exc)}
    texts = [o.outputs[0].text for o in outputs]
    result = score(texts, dense or texts, examples)
    result["tokens_per_step"] = (stats.total - before[0]) / max(stats.count - before[1], 1)
    if not dense:
        result["texts"] = texts
    return result


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
    parser.add_argument("--steps", type=int, default=None, help="default: gen-len")
    parser.add_argument("--block-length", type=int, default=None, help="default: gen-len")
    parser.add_argument("--block-size", type=int, default=128, help="SparseD tile size")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--json-out", default=None, help="also write the results here")
    parser.add_argument(
        "--batch-tokens", type=int, default=65536, help="tokens per engine step (all requests)"
    )
    parser.add_argument(
        "--configs", nargs="+", default=None, help="labels of configurations() to run (and dense)"
    )
    parser.add_argument("--runner", type=json.loads, default=None, help="runner settings (JSON)")
    parser.add_argument(
        "--gpu-bundle",
        action="store_true",
        help="engine options for scripts/gpu_vllm_run.sh (torch ops, not vLLM compiled ones)",
    )
    args = parser.parse_args()

    steps, block_length = args.steps or args.gen_len, args.block_length or args.gen_len
    # The engine in this process: its decoding statistics give the tokens per step.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model = Path(args.model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    ids = TokenIds.for_vocab(vocab)
    max_model_len = max(args.lengths) + 2 * args.gen_len + 64
    extra_engine = {}
    if args.runner is not None:
        extra_engine["additional_config"] = {"runner": args.runner}
    if args.gpu_bundle:
        extra_engine["compilation_config"] = {"custom_ops": ["none"]}
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
    if args.configs is not None:
        unknown = set(args.configs) - {label for label, _ in configs}
        if unknown:
            parser.error(f"unknown configurations {sorted(unknown)}")
        configs = [c for c in configs if c[0] == "dense" or c[0] in args.configs]
    progress = tqdm(total=len(args.lengths) * len(configs), desc="configurations", unit="config")
    for length in args.lengths:
        examples = tasks.make_examples(
            args.n * len(args.kinds), args.seed + length, length, args.kinds, token_counter(tok)
        )
        prompts = [
            {"prompt_token_ids": encode_example(tok, e, ids, args.gen_len)[0]} for e in examples
        ]
        dense: list[str] = []
        for label, extra in configs:
            params = mode_params(args.gen_len, extra, steps, block_length)
            result = run_mode(llm, prompts, params, examples, dense)
            dense = dense or result.pop("texts", [])
            rows.setdefault(label, {})[length] = result
            progress.update()
            tqdm.write(f"{length} tokens, {label}: {result}")
            if args.json_out:  # after every configuration, so a cut-short run keeps its part
                Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    for kind in ["all", *args.kinds]:
        print(f"\n{kind}: accuracy (same answer as dense)\n")
        print(markdown_table(args.lengths, rows, kind))


if __name__ == "__main__":
    main()
