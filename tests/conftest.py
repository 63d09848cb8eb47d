"""Shared fixtures: tiny LLaDA / Dream checkpoints written once per session, and their models."""

import pytest

from sparsed_vllm.checkpoint import write_checkpoint
from sparsed_vllm.configs import register_configs


@pytest.fixture(scope="session")
def llada_tiny_dir(tmp_path_factory):
    """A `tiny` LLaDA checkpoint dir (seed 0, fp32), with the configs registered."""
    register_configs()
    return write_checkpoint(tmp_path_factory.mktemp("llada-tiny"), "llada", seed=0)


@pytest.fixture(scope="session")
def dream_tiny_dir(tmp_path_factory):
    """A `tiny` Dream checkpoint dir (seed 0, fp32), with the configs registered."""
    register_configs()
    return write_checkpoint(tmp_path_factory.mktemp("dream-tiny"), "dream", seed=0)


@pytest.fixture(scope="session")
def llada_tiny(llada_tiny_dir):
    """The reference LLaDAModel of `llada_tiny_dir`, fp32 on CPU."""
    from sparsed_vllm.reference.models import LLaDAModel

    return LLaDAModel.from_pretrained(llada_tiny_dir)


@pytest.fixture(scope="session")
def dream_tiny(dream_tiny_dir):
    """The reference DreamModel of `dream_tiny_dir`, fp32 on CPU."""
    from sparsed_vllm.reference.models import DreamModel

    return DreamModel.from_pretrained(dream_tiny_dir)


@pytest.fixture(scope="module")
def single_thread():
    """Run torch on one thread: tiny models gain nothing from two, and on a busy 2-core machine
    OpenMP spin-waiting makes them hundreds of times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
