"""Long-context retrieval with the shipped trained checkpoint: published decoding, SparseD, and the
cached and parallel modes side by side, through vLLM.

    python examples/demo.py [--length 2048] [--n 3]

`checkpoints/llada-long` is a small LLaDA-format model this project trained to find a passkey
hidden at a random depth in 512 to 32k tokens of distractor text (its README has the training
record); the demo asks for an 8-token answer, which it gives in one block. Every question is
asked in each mode; the table shows how many answers are right, the wall time of the batch and the
tokens committed per denoising step (from the engine's `sparsed:tokens_committed_per_step`
statistics).
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
import tasks  # noqa: E402  (the task generator the model was trained on)

# The engine runs in this process, so its statistics can be read after each batch; its log lines
# (start-up notes, per-request summaries) would interleave with the table.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

BASE = {"steps": 8, "block_length": 8}  # an 8-token answer canvas, one token per step
MODES = {
    "published (dense)": {**BASE, "sparsed": False},
    "SparseD": {**BASE, "sparsed": True},
    "dual KV cache": {**BASE, "cache": "dual"},
    "dual + threshold 0.9": {**BASE, "cache": "dual", "threshold": 0.9},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--n", type=int, default=3, help="number of questions")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    model = REPO / "checkpoints" / "llada-long"
    llm = LLM(model=str(model), max_model_len=args.length + 256, enforce_eager=True, seed=0)
    stats = llm.llm_engine.engine_core.engine_core.scheduler.stats
    tokenizer = llm.get_tokenizer()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    rng = random.Random(2026)
    examples = [tasks.passkey(rng, args.length, count) for _ in range(args.n)]
    prompts = [e.prompt for e in examples]
    # One untimed request first: the first forward pays one-time set-up costs.
    llm.generate(prompts[:1], SamplingParams(max_tokens=8, extra_args=BASE), use_tqdm=False)
    answers = {}
    print(f"\n{args.n} questions, about {args.length} tokens each\n")
    print(f"{'mode':22} {'correct':>8} {'time':>7} {'tokens/step':>12}")
    for name, extra in MODES.items():
        params = SamplingParams(max_tokens=8, temperature=0, extra_args=extra)
        committed = stats.tokens_per_step.total, stats.tokens_per_step.count
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = stats.tokens_per_step.total - committed[0]
        steps = stats.tokens_per_step.count - committed[1]
        answers[name] = [o.outputs[0].text.strip() for o in outputs]
        correct = sum(map(tasks.is_correct, answers[name], examples))
        print(f"{name:22} {correct:>5}/{args.n} {seconds:>6.2f}s {tokens / steps:>12.1f}")
    print()
    for i, example in enumerate(examples):
        depth = example.prompt.index("The passkey is") / len(example.prompt)
        print(f"question {i + 1}: passkey {example.answer!r} at {depth:.0%} depth")
        for name in MODES:
            mark = "right" if tasks.is_correct(answers[name][i], example) else "wrong"
            print(f"    {name:22} {answers[name][i]!r:24} {mark}")


if __name__ == "__main__":
    main()
