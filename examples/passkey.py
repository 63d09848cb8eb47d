"""Passkey retrieval with the shipped trained checkpoint, dense vs SparseD, through vLLM.

    python examples/passkey.py [--length 2048] [--n 8] [--select 0.3]

`checkpoints/llada-retrieval` was trained by this project to find a 3-word passkey hidden at a
random depth in distractor text (see its README). Each prompt is sent twice: dense (`sparsed:
false`) and with SparseD forced on (`sparsed: true`: the plugin's `min_seq_len` would otherwise
keep prompts this short dense), with the plugin's default skip and the given select.
On CPU this takes a minute or two; at 2k tokens the sparse steps are a minority of the 8 and the
model is tiny, so timings here say little (attention-level numbers: benchmarks/RESULTS.md).
"""

import argparse
import random
import sys
import time
from pathlib import Path

from vllm import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
import tasks  # noqa: E402  (the generator the model was trained on)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--n", type=int, default=8, help="number of prompts")
    parser.add_argument("--select", type=float, default=0.3, help="SparseD fraction of tiles kept")
    parser.add_argument("--block-size", type=int, default=128, help="SparseD tile size")
    args = parser.parse_args()

    model = REPO / "checkpoints" / "llada-retrieval"
    llm = LLM(model=str(model), max_model_len=args.length + 256, enforce_eager=True, seed=0)
    tokenizer = llm.get_tokenizer()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    rng = random.Random(2026)
    examples = [tasks.passkey(rng, args.length, count) for _ in range(args.n)]
    prompts = [e.prompt for e in examples]
    base = {"steps": 8, "block_length": 8}  # one canvas of 8 tokens, one token per step
    sparse = {"sparsed": True, "sparsed_select": args.select}
    sparse["sparsed_block_size"] = args.block_size
    answers = {}
    for name, extra in (("dense", {"sparsed": False}), ("SparseD", sparse)):
        params = SamplingParams(max_tokens=8, temperature=0, extra_args={**base, **extra})
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        answers[name] = [o.outputs[0].text.strip() for o in outputs]
        correct = sum(map(tasks.is_correct, answers[name], examples))
        print(f"{name:8s} {correct}/{len(examples)} correct in {seconds:.1f}s")
    for example, dense, sparsed in zip(examples, answers["dense"], answers["SparseD"], strict=True):
        depth = example.prompt.index("The passkey is") / len(example.prompt)
        print(f"depth {depth:4.0%}  key {example.answer!r:22}", end="")
        print(f"  dense {dense!r:22}  SparseD {sparsed!r}")


if __name__ == "__main__":
    main()
