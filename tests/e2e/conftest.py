"""Real vLLM engines (CPU build) on the tiny checkpoints, one per model for the whole session.

Each engine start costs 20-30 s and about 3 GB, so tests share them.
"""

import json
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Lets tests run a function on the worker's model through collective_rpc (test-only).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

pytest.importorskip("vllm")

from engines import make_llm  # noqa: E402  (after the skip: it imports vLLM)
from servers import serve  # noqa: E402


@pytest.fixture(scope="session")
def llada_llm(llada_tiny_dir):
    llm = make_llm(llada_tiny_dir)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def dream_llm(dream_tiny_dir):
    llm = make_llm(dream_tiny_dir)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def llada_mask(llada_tiny_dir) -> int:
    return json.loads((llada_tiny_dir / "config.json").read_text())["mask_token_id"]


@pytest.fixture(scope="session")
def dream_mask(dream_tiny_dir) -> int:
    return json.loads((dream_tiny_dir / "config.json").read_text())["mask_token_id"]


@pytest.fixture(scope="session")
def server(llada_tiny_dir, tmp_path_factory):
    """One OpenAI server on the tiny LLaDA checkpoint for the session (about 30 s to start)."""
    with serve(llada_tiny_dir, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def model(llada_tiny_dir):
    return str(llada_tiny_dir)
