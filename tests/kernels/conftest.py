"""Kernel tests: `gpu` marker (skipped without CUDA + Triton), NaN-poisoned `torch.empty`,
and the relative-RMS comparison every kernel test uses."""

import importlib.util

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and Triton")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and Triton")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Fill new floating tensors with NaN so an output the kernel forgot to write fails the test."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(empty_like(*a, **kw)))


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    ref, out = ref.double(), out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.fixture
def assert_close():
    def check(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
        assert not torch.isnan(out).any(), f"{name}: NaN in output"
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        err = rel_rms(ref, out)
        assert err < tol, f"{name}: relative RMS error {err:.3e} >= {tol:.1e}"

    return check
