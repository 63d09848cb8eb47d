"""LLaDA through `vllm.LLM.generate` with the plugin on a GPU: tokens against the reference, then
dense vs SparseD throughput at long lengths. Run it through scripts/gpu_vllm_run.sh.

    bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_e2e.py --out out [--lengths 8192,16384,32768]
    # the full 32-layer model, a whole generation (T=128), random weights made by vLLM:
    bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_e2e.py --out out --skip-exact --layers 32 \
        --dummy-weights --steps 128 --lengths 8192,16384

1. Exactness (fp32, small LLaDA checkpoint): vLLM on the GPU against the reference generate loop
   on the CPU, greedy; dense, and SparseD (block 16, select 0.3, skip 0.2) against the reference
   running tests/e2e/sparsed_oracle.py's attention.
2. Speed (bf16, LLaDA-8B layer shape with `--layers` layers, random weights): one request per
   total length L, prompt L - gen, `--gen` (256) tokens in one block, `--steps` (32) steps
   (SparseD at 32 steps: 7 dense, 1 selection, 24 sparse steps at block 128, select 0.3). Wall
   time of `LLM.generate` for the request, second of two runs. bf16 dense tokens are also
   compared with the reference model run in bf16 on the GPU (agreement, not equality: bf16
   kernels round differently; skipped with `--dummy-weights`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [list(range(3, 40)), [11, 12, 13, 14, 15]]
SPARSE_SMALL = {"sparsed": True, "sparsed_block_size": 16, "sparsed_select": 0.3}


def write_checkpoint(out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sparsed_vllm.checkpoint", "--arch", "llada", "--out", str(out)]
    return subprocess.Popen(cmd + list(args), stdout=subprocess.DEVNULL)


def make_llm(model: Path, dtype: str, max_model_len: int, **kwargs):
    import vllm

    return vllm.LLM(
        model=str(model),
        dtype=dtype,
        enforce_eager=True,
        compilation_config={"custom_ops": ["none"]},
        max_model_len=max_model_len,
        max_num_seqs=4,
        seed=0,
        # No KV cache is allocated; the check at start-up only needs this share to be free.
        gpu_memory_utilization=0.5,
        **kwargs,
    )


def generate_ids(llm, prompts, extra, gen, steps, block_length):
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=gen,
        temperature=0,
        ignore_eos=True,
        extra_args={"steps": steps, "block_length": block_length, **extra},
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def reference_ids(model_dir: Path, prompt, gen, steps, block_length, dtype, device, sparse=None):
    from sparsed_vllm.reference.generate import llada_generate
    from sparsed_vllm.reference.models import LLaDAModel

    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from sparsed_oracle import SparsedOracle

    model = LLaDAModel.from_pretrained(model_dir, dtype=dtype, device=device)
    mask = json.loads((model_dir / "config.json").read_text())["mask_token_id"]
    if sparse is not None:
        layers = model.config.num_hidden_layers
        model.attn_fn = SparsedOracle(layers, steps, gen, sparse["skip"], 0.3, 16)
    with torch.inference_mode():
        out = llada_generate(
            model,
            torch.tensor([prompt], device=device),
            steps=steps,
            gen_length=gen,
            block_length=block_length,
            mask_id=mask,
        )
    return out[0, len(prompt) :].tolist()


def check_exact(small: Path, report: dict) -> None:
    dense_ref = [reference_ids(small, p, 32, 32, 8, torch.float32, "cpu") for p in PROMPTS]
    sparse_ref = [
        reference_ids(small, p, 32, 32, 8, torch.float32, "cpu", sparse={"skip": 0.2})
        for p in PROMPTS
    ]
    llm = make_llm(small, "float32", 256)
    dense = generate_ids(llm, PROMPTS, {"sparsed": False}, 32, 32, 8)
    sparse = generate_ids(llm, PROMPTS, SPARSE_SMALL, 32, 32, 8)
    llm.llm_engine.engine_core.shutdown()
    del llm
    report["fp32_dense_equal"] = dense == dense_ref
    report["fp32_sparsed_equal"] = sparse == sparse_ref
    report["fp32_detail"] = {
        "dense": dense,
        "dense_ref": dense_ref,
        "sparse": sparse,
        "sparse_ref": sparse_ref,
    }
    print(f"fp32 exactness: dense {dense == dense_ref}, SparseD {sparse == sparse_ref}", flush=True)


def bench(
    full: Path,
    lengths: list[int],
    report: dict,
    ref_device: str,
    gen: int = 256,
    steps: int = 32,
    dummy: bool = False,
    warmup_steps: int | None = None,
) -> None:
    extra_engine = {"load_format": "dummy"} if dummy else {}
    llm = make_llm(
        full,
        "bfloat16",
        max(lengths),
        additional_config={"sparsed": {"min_seq_len": 0}},
        **extra_engine,
    )
    config = json.loads((full / "config.json").read_text())
    high = min(config["vocab_size"], config["mask_token_id"])  # ordinary tokens only
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in lengths:
        prompt = torch.randint(0, high, (length - gen,), generator=g).tolist()
        for mode in ("dense", "sparsed"):
            extra = {"sparsed": mode == "sparsed"}
            times = []
            # The first run warms up (kernel compilation, autotuning, allocator); with
            # `warmup_steps` it is a shorter schedule that still reaches every stage.
            for run_steps in (warmup_steps or steps, steps):
                torch.cuda.synchronize() if torch.cuda.is_initialized() else None
                start = time.perf_counter()
                ids = generate_ids(llm, [prompt], extra, gen, run_steps, gen)[0]
                times.append(time.perf_counter() - start)
            row = {
                "L": length,
                "mode": mode,
                "wall_s": times,
                "step_ms": 1e3 * times[-1] / steps,
                "tok_per_s": gen / times[-1],
                "ids": ids,
            }
            rows.append(row)
            print(
                f"L={length} {mode}: {times[-1]:.3f} s ({row['step_ms']:.1f} ms/step, "
                f"{row['tok_per_s']:.1f} tok/s; warm-up run {times[0]:.3f} s)",
                flush=True,
            )
        dense, sparse = rows[-2]["ids"], rows[-1]["ids"]
        rows[-1]["agree_with_dense"] = sum(a == b for a, b in zip(dense, sparse, strict=True)) / gen
    llm.llm_engine.engine_core.shutdown()
    del llm
    report["bench"] = rows
    if dummy:  # vLLM's random weights exist only inside the engine: no reference to compare
        return
    # bf16 agreement with the reference model on the GPU at the shortest length.
    first = rows[0]
    prompt = torch.randint(0, high, (lengths[0] - gen,), generator=torch.Generator().manual_seed(0))
    ref = reference_ids(full, prompt.tolist(), gen, steps, gen, torch.bfloat16, ref_device)
    report["bf16_dense_agreement"] = (
        sum(a == b for a, b in zip(ref, first["ids"], strict=True)) / gen
    )
    print(
        f"bf16 dense vs reference (GPU, bf16) at L={lengths[0]}: "
        f"{100 * report['bf16_dense_agreement']:.1f}% of tokens equal",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--layers", default="2")
    parser.add_argument("--work", default="/tmp/sparsed-ckpt")
    parser.add_argument("--preset", default="full", help="shape of the speed checkpoint")
    parser.add_argument("--ref-device", default="cuda")
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--gen", type=int, default=256, help="canvas length (one block)")
    parser.add_argument("--steps", type=int, default=32, help="denoising steps")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="steps of the untimed first run (default: --steps); it must still cover the "
        "dense, selection and sparse stages (skip 0.2: at least 5 steps)",
    )
    parser.add_argument(
        "--dummy-weights",
        action="store_true",
        help="write no weights; vLLM makes random ones (load_format=dummy): full 32-layer "
        "shapes start in seconds; no bf16 reference comparison",
    )
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    small, full = work / "llada-small", work / "llada-full"
    t0 = time.perf_counter()
    # The large checkpoint is written while the exactness check runs.
    writer = write_checkpoint(
        full,
        "--preset",
        args.preset,
        "--layers",
        args.layers,
        "--max-len",
        str(max(lengths)),
        "--dtype",
        "bfloat16",
        *(["--no-weights"] if args.dummy_weights else []),
    )
    report: dict = {"device": None, "torch": torch.__version__, "argv": sys.argv[1:]}
    if not args.skip_exact:
        write_checkpoint(small, "--preset", "small", "--dtype", "float32").wait()
        check_exact(small, report)
    if writer.wait():
        raise SystemExit("writing the large checkpoint failed")
    print(f"checkpoints ready after {time.perf_counter() - t0:.0f} s", flush=True)
    bench(
        full,
        lengths,
        report,
        args.ref_device,
        args.gen,
        args.steps,
        args.dummy_weights,
        args.warmup_steps,
    )
    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (out / "gpu_vllm_e2e.json").write_text(json.dumps(report, indent=1))
    print(f"device {report['device']}")
    print(
        "| L | dense s | dense ms/step | dense tok/s | SparseD s | SparseD ms/step "
        "| SparseD tok/s | speed-up |"
    )
    rows = report["bench"]
    for d, s in zip(rows[::2], rows[1::2], strict=True):
        print(
            f"| {d['L']} | {d['wall_s'][-1]:.2f} | {d['step_ms']:.1f} | {d['tok_per_s']:.0f} | "
            f"{s['wall_s'][-1]:.2f} | {s['step_ms']:.1f} | {s['tok_per_s']:.0f} | "
            f"{d['wall_s'][-1] / s['wall_s'][-1]:.2f}x |"
        )


if __name__ == "__main__":
    main()
