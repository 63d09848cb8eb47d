"""Tensor parallelism through Ray (`distributed_executor_backend="ray"`), on CPU.

vLLM refuses Ray on its CPU platform; the test-only platform plugin
`sparsed_vllm_testing.ray_platform` (tests/support; active with SPARSED_VLLM_TEST_RAY_PLATFORM=1)
lifts that, so the Ray path runs here as on a GPU cluster: workers are Ray actors that load this
plugin through its entry point, and the scheduler's per-request metadata reaches them every step.
The engine runs in `ray_tp_driver.py`, a process of its own (see why there): one TP=2 engine,
about 60 s.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from vllm import SamplingParams

pytest.importorskip("ray")

DRIVER = Path(__file__).with_name("ray_tp_driver.py")
TP = 2
HEADS = 4  # query heads of the tiny preset (2 per rank)
PROMPTS = [list(range(3, 40)), [11, 12, 13, 14, 15], list(range(50, 73))]


def llada_batch(extra, temperature=0.8, seed=7):
    """Greedy, sampled, and classifier-free guidance, as SamplingParams keyword arguments."""
    base = {"steps": 32, "block_length": 8, **extra}
    params = [
        {"max_tokens": 32, "temperature": 0, "extra_args": base},
        {"max_tokens": 32, "temperature": temperature, "seed": seed, "extra_args": base},
        {"max_tokens": 16, "temperature": 0, "extra_args": {**base, "steps": 16, "cfg_scale": 1.0}},
    ]
    return [
        {"prompt": prompt, "params": {**p, "ignore_eos": True}}
        for prompt, p in zip(PROMPTS, params, strict=True)
    ]


SPARSE = {"sparsed": True, "sparsed_block_size": 16}
BATCHES = {
    "dense": llada_batch({"sparsed": False}),
    "sparsed": llada_batch(SPARSE),
    # The scheduler draws the seed; only the ranks' agreement can be checked.
    "unseeded": llada_batch(SPARSE, temperature=1.0, seed=None),
}


@pytest.fixture(scope="module")
def ray_result(llada_tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("ray-tp")
    # Ray's socket paths must stay short (about 100 characters): not under pytest's folder.
    ray_temp_dir = tempfile.mkdtemp(prefix="ray-")
    job = {
        "model": str(llada_tiny_dir),
        "tensor_parallel_size": TP,
        "ray_temp_dir": ray_temp_dir,
        "batches": BATCHES,
    }
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "SPARSED_VLLM_TEST_RAY_PLATFORM": "1"}
    # A loopback cluster of this test only: no token, even if the machine has one for Ray.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        proc = subprocess.run(
            [sys.executable, str(DRIVER), str(work / "job.json"), str(work / "out.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
    finally:
        shutil.rmtree(ray_temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((work / "out.json").read_text())


def generate_ids(llm, requests):
    outs = llm.generate(
        [{"prompt_token_ids": r["prompt"]} for r in requests],
        [SamplingParams(**r["params"]) for r in requests],
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("mode", ["dense", "sparsed"])
def test_ray_tp2_equals_tp1(ray_result, llada_llm, mode):
    expected = generate_ids(llada_llm, BATCHES[mode])
    assert ray_result["tokens"][mode] == expected
    assert [len(t) for t in expected] == [32, 32, 16]


def test_ray_ranks_sample_alike_and_store_their_own_heads(ray_result):
    rank0, rank1 = ray_result["steps"]
    assert rank0 == rank1
    assert [len(t) for t in ray_result["tokens"]["unseeded"]] == [32, 32, 16]
    assert {tuple(step["pattern_heads"]) for step in rank0} == {(), (HEADS // TP,)}


def test_test_platform_is_off_unless_asked_and_not_shipped(monkeypatch):
    from importlib.metadata import distribution, entry_points

    from sparsed_vllm_testing import ray_platform

    plugins = {e.name: e.value for e in entry_points(group="vllm.platform_plugins")}
    expected = "sparsed_vllm_testing.ray_platform:activate"
    assert plugins["sparsed_vllm_testing_ray_cpu"] == expected
    shipped = {(e.group, e.value) for e in distribution("sparsed-vllm").entry_points}
    assert shipped == {
        ("vllm.general_plugins", "sparsed_vllm.plugin:register"),
        ("console_scripts", "sparsed_vllm.entrypoints.cli:main"),
    }
    monkeypatch.delenv(ray_platform.ENV, raising=False)
    assert ray_platform.activate() is None
    monkeypatch.setenv(ray_platform.ENV, "1")
    assert ray_platform.activate() == "sparsed_vllm_testing.ray_cpu_platform.RayCpuPlatform"
