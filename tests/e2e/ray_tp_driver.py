"""Run by test_ray.py in a process of its own: requests through a TP engine on the Ray executor.

A process of its own because vLLM resolves its platform once per process: the test-only Ray CPU
platform (`sparsed_vllm_testing.ray_platform`, tests/support) is active only where
SPARSED_VLLM_TEST_RAY_PLATFORM=1 was set before vLLM was first used. The driver starts a local
Ray cluster with one placeholder "GPU" per rank (as `ray start --num-gpus N` would), lets vLLM join
it, and stops it at the end, so no Ray process outlives the test.

    python ray_tp_driver.py JOB_JSON OUT_JSON

JOB_JSON: {"model", "tensor_parallel_size", "ray_temp_dir", "batches": {name: [{"prompt",
"params"}]}}, where params are SamplingParams keyword arguments. OUT_JSON: {"tokens": {name:
[token ids per request]}, "steps": [steps logged on each rank]}.
"""

import json
import os
import sys


def run(job: dict) -> dict:
    import ray
    from sparsed_vllm_testing import rank_probe
    from vllm import LLM, SamplingParams

    tp = job["tensor_parallel_size"]
    context = ray.init(num_gpus=tp, include_dashboard=False, _temp_dir=job["ray_temp_dir"])
    try:
        os.environ["RAY_ADDRESS"] = context.address_info["gcs_address"]
        llm = LLM(
            model=job["model"],
            dtype="float32",
            enforce_eager=True,
            max_model_len=256,
            max_num_seqs=16,
            seed=0,
            tensor_parallel_size=tp,
            distributed_executor_backend="ray",
        )
        try:
            llm.collective_rpc(rank_probe.record_steps)
            tokens = {}
            for name, requests in job["batches"].items():
                outs = llm.generate(
                    [{"prompt_token_ids": r["prompt"]} for r in requests],
                    [SamplingParams(**r["params"]) for r in requests],
                    use_tqdm=False,
                )
                tokens[name] = [list(o.outputs[0].token_ids) for o in outs]
            steps = llm.collective_rpc(rank_probe.take_steps)
        finally:
            llm.llm_engine.engine_core.shutdown()
    finally:
        ray.shutdown()
    return {"tokens": tokens, "steps": steps}


if __name__ == "__main__":
    job_file, out_file = sys.argv[1:]
    with open(job_file) as f:
        result = run(json.load(f))
    with open(out_file, "w") as f:
        json.dump(result, f)
