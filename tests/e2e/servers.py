"""A real `sparsed-vllm serve` process on 127.0.0.1, and what tests read from it."""

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# fp32 like the offline engines (engines.ENGINE_DEFAULTS), so served tokens equal offline ones.
SERVE_ARGS = [
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "256",
    "--max-num-seqs",
    "16",
    "--seed",
    "0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model_dir: Path, log: Path, extra_args: tuple[str, ...] = ()):
    """Start the server, wait until /health answers, yield its base URL, stop it."""
    port = _free_port()
    cmd = [sys.executable, "-m", "sparsed_vllm.entrypoints.cli", "serve", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *SERVE_ARGS, *extra_args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while not healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            if time.time() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def metric(server: str, name: str) -> float:
    """Sum of a Prometheus metric's series on the server's /metrics."""
    text = httpx.get(f"{server}/metrics", timeout=10).text
    values = re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, flags=re.M)
    assert values, f"{name} not exported"
    return sum(float(v) for v in values)


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True
