"""Write a small LLaDA (or Dream) checkpoint and generate with it through vLLM.

    python examples/offline_generate.py [--arch llada|dream] [--out DIR]

The weights are random (nothing is downloaded), so the text is gibberish; what the demo shows is
the serving path: the plugin loads automatically, requests with different diffusion parameters
share a batch, and each block of tokens arrives once it is committed.
"""

import argparse
import time
from pathlib import Path

from vllm import LLM, SamplingParams

from sparsed_vllm.checkpoint import write_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["llada", "dream"], default="llada")
    parser.add_argument("--out", default=None, help="checkpoint dir (default .cache/demo/<arch>)")
    args = parser.parse_args()

    out = Path(args.out or f".cache/demo/{args.arch}-small")
    if not (out / "config.json").exists():
        write_checkpoint(out, args.arch, preset="small", seed=0)
    print(f"checkpoint: {out}")

    llm = LLM(model=str(out), max_model_len=1024, enforce_eager=True)
    if args.arch == "llada":
        extras = [
            {"steps": 32, "block_length": 8},
            {"steps": 16, "block_length": 16, "cfg_scale": 1.0},
        ]
    else:
        extras = [{"steps": 32, "alg": "entropy"}, {"steps": 16, "alg": "maskgit_plus"}]
    params = [
        SamplingParams(max_tokens=32 if i == 0 else 16, temperature=0, extra_args=e)
        for i, e in enumerate(extras)
    ]
    conversations = [
        [{"role": "user", "content": "Write a haiku about diffusion."}],
        [{"role": "user", "content": "What is 12 times 7?"}],
    ]
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for conversation, extra, output in zip(conversations, extras, outputs, strict=True):
        completion = output.outputs[0]
        print(f"\nuser: {conversation[0]['content']}\nparams: {extra}")
        print(f"tokens ({len(completion.token_ids)}, {completion.finish_reason}):")
        print(f"  {completion.token_ids}")
        print(f"text: {completion.text!r}")
    print(f"\n{len(outputs)} requests in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
