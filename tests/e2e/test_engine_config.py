"""Engine configuration the plugin chooses when the user leaves it to vLLM."""

import subprocess
import sys

import pytest
from vllm import EngineArgs
from vllm.config import CompilationMode


def engine_config(model_dir, **kwargs):
    args = EngineArgs(model=str(model_dir), dtype="float32", max_model_len=256, **kwargs)
    return args.create_engine_config()


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_default_runs_vllm_fused_custom_ops(llada_tiny_dir, enforce_eager):
    # The diffusion runner never compiles the model; with vLLM's default compile mode its fused
    # RMSNorm / RoPE / SiLU-and-mul ops would be off ("none") and run as plain torch ops.
    config = engine_config(llada_tiny_dir, enforce_eager=enforce_eager).compilation_config
    assert config.mode == CompilationMode.NONE
    assert "all" in config.custom_ops and "none" not in config.custom_ops


def test_explicit_compilation_settings_are_kept(llada_tiny_dir):
    ops_off = engine_config(llada_tiny_dir, compilation_config={"custom_ops": ["none"]})
    assert ops_off.compilation_config.custom_ops == ["none"]
    compiled = engine_config(llada_tiny_dir, compilation_config={"mode": 3})
    assert compiled.compilation_config.mode != CompilationMode.NONE


def test_gpu_worker_leaves_torch_cuda_streams_alone():
    """vLLM's CPU worker module swaps torch.cuda.Stream/stream/Event for placeholders when
    imported; the GPU worker module must not import it (CUDA graph capture then fails)."""
    code = (
        "import sys, torch; stream = torch.cuda.stream; "
        "import sparsed_vllm.vllm_glue.worker; "
        "assert 'vllm.v1.worker.cpu_worker' not in sys.modules, 'CPU worker imported'; "
        "assert torch.cuda.stream is stream, 'torch.cuda.stream replaced'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    # The CPU worker still loads (and does patch, which is harmless on a CPU engine).
    subprocess.run([sys.executable, "-c", "import sparsed_vllm.vllm_glue.cpu_worker"], check=True)


def test_vendor_kernels_are_refused_without_a_gpu(llada_tiny_dir):
    # Checked when the engine config is made (the config hook), before any worker starts.
    with pytest.raises(ValueError, match="sparse_kernel 'fa4' needs a CUDA GPU"):
        engine_config(llada_tiny_dir, additional_config={"runner": {"sparse_kernel": "fa4"}})
    with pytest.raises(ValueError, match="sparse_kernel must be one of"):
        engine_config(llada_tiny_dir, additional_config={"runner": {"sparse_kernel": "cute"}})
    with pytest.raises(ValueError, match="cached_kernel 'fa3' needs a CUDA GPU"):
        engine_config(llada_tiny_dir, additional_config={"runner": {"cached_kernel": "fa3"}})


@pytest.mark.parametrize(
    "option,name,module",
    [
        ("sparse_kernel", "fa4", "sparsed_vllm.kernels.block_sparse.fa4"),
        ("cached_kernel", "fa3", "sparsed_vllm.kernels.cached.fa3"),
    ],
)
def test_auto_picks_the_vendor_kernel_only_where_it_measured_faster(
    monkeypatch, option, name, module
):
    """The default, "auto": FA4 (sparse steps) or FA3 (dense cached steps) on Hopper when it
    imports; Triton on other GPUs, when it does not import, and off CUDA. Naming a vendor kernel
    that cannot import is refused with the reason."""
    import importlib

    import torch

    from sparsed_vllm.vllm_glue.model_runner import _choose_kernel

    vendor = importlib.import_module(module)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _choose_kernel(option, "auto", cpu) == "triton"
    assert _choose_kernel(option, "triton", cpu) == "triton"
    cases = [((9, 0), True, name), ((9, 0), False, "triton"), ((10, 0), True, "triton")]
    for capability, available, want in cases + [((8, 9), True, "triton")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _=None, c=capability: c)
        monkeypatch.setattr(vendor, f"{name}_available", lambda a=available: a)
        assert _choose_kernel(option, "auto", cuda) == want, (capability, available)
        assert _choose_kernel(option, "triton", cuda) == "triton"
        if available:
            assert _choose_kernel(option, name, cuda) == name
    monkeypatch.setattr(vendor, f"{name}_available", lambda: False)
    monkeypatch.setattr(vendor, f"{name}_import_error", lambda: "ImportError: no module named x")
    with pytest.raises(ValueError, match=f"'{name}' cannot run here: ImportError: no module named"):
        _choose_kernel(option, name, cuda)
