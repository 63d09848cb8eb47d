"""Cached and parallel decoding through `vllm.LLM` on a GPU: exactness, then speed (issue 14).

    bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_cached.py --out out [--parts exact,batch,...]

Parts (each writes its section of `gpu_vllm_cached.json` in --out):
- exact: fp32 `small` LLaDA and Dream checkpoints; every cache mode (and threshold/factor) in one
  mixed batch on the GPU, against the plain PyTorch oracle on the CPU, token for token.
- batch: LLaDA-8B shape (32 layers, bf16, vLLM's random weights), prompts of 512 tokens, 256 new
  tokens, blocks of 32, 64 steps; batch 1, 8 and 32; exact vs prefix vs dual at equal steps.
  Wall time of `LLM.generate` after one untimed warm-up batch per mode.
- long: one request of 16k and one of 32k tokens, 256 new tokens, blocks of 32, T=256: dual
  measured whole; exact dense measured over `--exact-steps` steps of the same shape (every exact
  step costs the same: the whole sequence) and projected to T=256.

Threshold decoding needs a trained model (random weights never pass a threshold): its tokens per
step and answers on the shipped checkpoint come from training/eval_sparsed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [list(range(3, 40)), [11, 12, 13, 14, 15], list(range(50, 73))]


def write_checkpoint(out: Path, arch: str, *args: str) -> Path:
    cmd = [sys.executable, "-m", "sparsed_vllm.checkpoint", "--arch", arch, "--out", str(out)]
    subprocess.run(cmd + list(args), check=True, stdout=subprocess.DEVNULL)
    return out


# The bundle's torch reports a device total of a few GiB to vLLM's start-up memory snapshot on
# these machines, so vLLM's own sizing would leave the KV cache no room: size it explicitly.
KV_CACHE_BYTES = int(os.environ.get("SPARSED_KV_CACHE_GIB", "40")) * 2**30


def make_llm(model: Path, dtype: str, max_model_len: int, **kwargs):
    import vllm

    options = dict(
        model=str(model),
        dtype=dtype,
        enforce_eager=True,
        compilation_config={"custom_ops": ["none"]},
        max_model_len=max_model_len,
        max_num_seqs=32,
        seed=0,
        gpu_memory_utilization=0.5,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
    )
    return vllm.LLM(**{**options, **kwargs})


def generate(llm, prompts, extras, gen, **sampling):
    from vllm import SamplingParams

    params = [
        SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True, extra_args=e, **sampling)
        for e in extras
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def part_exact(work: Path) -> dict:
    """fp32 GPU engine vs the CPU oracle, every mode in one batch."""
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from cached_oracle import dream_tokens, llada_tokens

    from sparsed_vllm.reference.models import load_reference_model

    modes = [
        {"steps": 16, "block_length": 8},
        {"steps": 16, "block_length": 8, "cache": "prefix"},
        {"steps": 16, "block_length": 8, "cache": "dual"},
        {"steps": 16, "block_length": 8, "cache": "dual", "threshold": 0.3},
        {"steps": 16, "block_length": 8, "cache": "prefix", "factor": 1.0},
        {"steps": 16, "block_length": 8, "threshold": 0.3},
    ]
    report = {}
    for arch, oracle in (("llada", llada_tokens), ("dream", dream_tokens)):
        ckpt = write_checkpoint(work / f"{arch}-small", arch, "--preset", "small")
        llm = make_llm(ckpt, "float32", 256)
        # Dream: its published single canvas for the first mode, blockwise for the others.
        dream = [{"steps": 16, "alg": "entropy"}] + [{**m, "alg": "entropy"} for m in modes[1:]]
        extras = modes if arch == "llada" else dream
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(extras))]
        got = generate(llm, prompts, extras, 32)
        llm.llm_engine.engine_core.shutdown()
        del llm
        model = load_reference_model(ckpt)
        mask = json.loads((ckpt / "config.json").read_text())["mask_token_id"]
        expected = [oracle(model, mask, p, 32, e) for p, e in zip(prompts, extras, strict=True)]
        equal = [g == e for g, e in zip(got, expected, strict=True)]
        report[arch] = {"modes": extras, "equal": equal}
        print(f"fp32 {arch}: engine == oracle per mode: {equal}", flush=True)
    return report


def timed(llm, prompts, extras, gen, warm_extras=None, full_warmup=False):
    """Seconds of one `generate` after an untimed warm-up: the same batch when `full_warmup`
    (Triton compiles a kernel variant per window shape; those must not land in the timing),
    else a short run of `warm_extras`."""
    if full_warmup:
        generate(llm, prompts, extras, gen)
    else:
        warm = warm_extras or extras[:2]
        generate(llm, prompts[: len(warm)], warm, min(gen, 64))
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate(llm, prompts, extras, gen)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def part_batch(work: Path, batches: list[int], layers: int) -> list[dict]:
    ckpt = write_checkpoint(
        work / "llada-full",
        "llada",
        *("--preset", "full", "--layers", str(layers), "--max-len", "1024", "--no-weights"),
    )
    llm = make_llm(ckpt, "bfloat16", 1024, load_format="dummy")
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        prompts = [torch.randint(0, 100000, (512,), generator=g).tolist() for _ in range(batch)]
        for cache in ("none", "prefix", "dual"):
            extra = {"steps": 64, "block_length": 32, "cache": cache}
            seconds = timed(llm, prompts, [extra] * batch, 256, full_warmup=cache != "none")
            row = {"batch": batch, "cache": cache, "s": seconds, "tok_s": batch * 256 / seconds}
            rows.append(row)
            print(
                f"batch {batch} cache {cache}: {seconds:.2f} s, {row['tok_s']:.0f} tok/s",
                flush=True,
            )
    llm.llm_engine.engine_core.shutdown()
    return rows


def part_long(work: Path, lengths: list[int], exact_steps: int, layers: int) -> list[dict]:
    longest = max(lengths)
    ckpt = write_checkpoint(
        work / "llada-long",
        "llada",
        *("--preset", "full", "--layers", str(layers), "--max-len", str(longest), "--no-weights"),
    )
    llm = make_llm(ckpt, "bfloat16", longest, load_format="dummy", max_num_seqs=2)
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in lengths:
        prompt = [torch.randint(0, 100000, (length - 256,), generator=g).tolist()]
        dual = {"steps": 256, "block_length": 32, "cache": "dual", "sparsed": False}
        warm = [{"steps": 8, "block_length": 32, "cache": "dual", "sparsed": False}]
        dual_s = timed(llm, prompt, [dual], 256, warm_extras=warm)
        exact = {"steps": exact_steps, "block_length": 32 * exact_steps // 8, "sparsed": False}
        exact_s = timed(llm, prompt, [exact], 256, warm_extras=[{**exact, "steps": 8}])
        projected = exact_s * 256 / exact_steps
        row = {
            "L": length,
            "dual_s": dual_s,
            "exact_s_measured": exact_s,
            "exact_steps_measured": exact_steps,
            "exact_s_projected_T256": projected,
            "speedup": projected / dual_s,
        }
        rows.append(row)
        print(
            f"L={length}: dual {dual_s:.2f} s; exact {exact_s:.2f} s for {exact_steps} steps "
            f"-> {projected:.1f} s at T=256; {row['speedup']:.1f}x",
            flush=True,
        )
    llm.llm_engine.engine_core.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--work", default="/tmp/sparsed-cached")
    parser.add_argument("--parts", default="exact,batch,long")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--exact-steps", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32, help="layers of the LLaDA-8B shape")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report: dict = {"device": device, "argv": sys.argv[1:]}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        report["memory_gib"] = {"free": free / 2**30, "total": total / 2**30}
    parts = args.parts.split(",")

    def save() -> None:
        (out / "gpu_vllm_cached.json").write_text(json.dumps(report, indent=1))

    if "exact" in parts:
        report["exact"] = part_exact(work)
        save()
    if "batch" in parts:
        report["batch"] = part_batch(work, [int(b) for b in args.batches.split(",")], args.layers)
        save()
    if "long" in parts:
        lengths = [int(x) for x in args.lengths.split(",")]
        report["long"] = part_long(work, lengths, args.exact_steps, args.layers)
        save()


if __name__ == "__main__":
    main()
