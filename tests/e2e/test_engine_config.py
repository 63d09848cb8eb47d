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


def test_fa4_sparse_kernel_is_refused_without_a_gpu(llada_tiny_dir):
    # Checked when the engine config is made (the config hook), before any worker starts.
    with pytest.raises(ValueError, match="sparse_kernel 'fa4' needs a CUDA GPU"):
        engine_config(llada_tiny_dir, additional_config={"runner": {"sparse_kernel": "fa4"}})
    with pytest.raises(ValueError, match="sparse_kernel must be one of"):
        engine_config(llada_tiny_dir, additional_config={"runner": {"sparse_kernel": "cute"}})


def test_sparse_kernel_auto_picks_fa4_only_where_it_measured_faster(monkeypatch):
    """The default, "auto": FA4 on Hopper when it imports, Triton on other GPUs, when FA4 does
    not import, and off CUDA; "fa4" where FA4 cannot import is refused with the reason."""
    import torch
    from sparsed_vllm.kernels.block_sparse import fa4

    from sparsed_vllm.vllm_glue.model_runner import _sparse_kernel

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _sparse_kernel("auto", cpu) == "triton" and _sparse_kernel("triton", cpu) == "triton"
    cases = [((9, 0), True, "fa4"), ((9, 0), False, "triton"), ((10, 0), True, "triton")]
    for capability, available, want in cases + [((8, 9), True, "triton")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _=None, c=capability: c)
        monkeypatch.setattr(fa4, "fa4_available", lambda a=available: a)
        assert _sparse_kernel("auto", cuda) == want, (capability, available)
        assert _sparse_kernel("triton", cuda) == "triton"
        if available:
            assert _sparse_kernel("fa4", cuda) == "fa4"
    monkeypatch.setattr(fa4, "fa4_available", lambda: False)
    monkeypatch.setattr(fa4, "fa4_import_error", lambda: "ImportError: no module named cutlass")
    with pytest.raises(ValueError, match="'fa4' cannot run here: ImportError: no module named"):
        _sparse_kernel("fa4", cuda)
