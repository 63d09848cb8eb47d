"""What each attention backend can run: the one table that validation and dispatch both read.

The attention layer dispatches with `select_backend(device_type, dtype, head_dim)`; the front end
and the scheduler validate every request against the backend the same call returns for the
engine's device, dtype and head size. A setting is valid only if that backend runs it, so a
request the kernels cannot run is refused before it reaches a step (no vLLM import here).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sparsed_vllm.core.errors import ParameterError
from sparsed_vllm.core.params import CACHE_MODES

TRITON = "triton"
EXACT = "exact"


@dataclass(frozen=True)
class Backend:
    """An attention backend and the SparseD settings it supports."""

    name: str
    # SparseD tile sizes (`sparsed_block_size`) its selection and sparse attention take.
    tile_sizes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    # None: any head size.
    head_dims: tuple[int, ...] | None
    # None: any device type.
    device_types: tuple[str, ...] | None
    # Decoding cache modes it runs (core.params.CACHE_MODES), and the KV-cache page sizes (vLLM's
    # KV block size, --block-size) its cached attention reads; None: any page size.
    cache_modes: tuple[str, ...]
    kv_page_sizes: tuple[int, ...] | None
    # SparseD on cached decoding (block-sparse attention of a window against its KV pages).
    cached_sparse: bool

    def runs(self, device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
        return (
            (self.device_types is None or device_type in self.device_types)
            and dtype in self.dtypes
            and (self.head_dims is None or head_dim in self.head_dims)
        )

    def check_page_size(self, page_size: int) -> None:
        """ValueError (at start-up) if the engine's KV page size is one this backend cannot read."""
        if self.kv_page_sizes is not None and page_size not in self.kv_page_sizes:
            raise ValueError(
                f"KV cache block size (--block-size) {page_size} is not supported by the "
                f"{self.name} attention backend; use one of {self.kv_page_sizes}"
            )

    def check_cache(self, cache: str) -> None:
        if cache not in self.cache_modes:
            raise ParameterError(
                "cache", f"cache {cache!r} is not run by the {self.name} attention backend"
            )

    def check_tile(self, name: str, value: object) -> int:
        """The tile size as an int; ValueError naming `name` if this backend cannot run it."""
        if isinstance(value, bool) or not isinstance(value, int) or value not in self.tile_sizes:
            raise ParameterError(
                name,
                f"{name} must be one of {self.tile_sizes} on the {self.name} attention backend, "
                f"got {value!r}",
            )
        return value


# Fastest first: dispatch takes the first backend that runs the engine's device, dtype and head
# size. The Triton kernels (sparsed_vllm.kernels) hold a [TILE, head_dim] block in registers and
# shared memory, which caps the tile at 128 and fixes the head sizes they were built for.
TRITON_BACKEND = Backend(
    name=TRITON,
    tile_sizes=(16, 32, 64, 128),
    dtypes=(torch.float16, torch.bfloat16),
    head_dims=(64, 128),
    device_types=("cuda",),
    cache_modes=CACHE_MODES,
    kv_page_sizes=(16, 32, 64, 128, 256),
    cached_sparse=True,
)
# Plain PyTorch (SDPA and tile gathers): any device, dtype and head size; exact in fp32.
EXACT_BACKEND = Backend(
    name=EXACT,
    tile_sizes=(16, 32, 64, 128, 256),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    head_dims=None,
    device_types=None,
    cache_modes=CACHE_MODES,
    kv_page_sizes=None,
    cached_sparse=True,
)
BACKENDS = (TRITON_BACKEND, EXACT_BACKEND)
# Every tile size some backend runs: what plugin-wide settings may name before the device is known.
ALL_TILE_SIZES = tuple(sorted({t for b in BACKENDS for t in b.tile_sizes}))


@functools.cache
def select_backend(device_type: str, dtype: torch.dtype, head_dim: int) -> Backend:
    """The backend attention runs on for this device type, dtype and head size."""
    for backend in BACKENDS:
        if backend.runs(device_type, dtype, head_dim):
            return backend
    raise ValueError(f"no attention backend runs {dtype} on {device_type}")


def fallback_reason(device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why a model on a CUDA device in half precision cannot use the Triton kernels, or None.

    fp32 takes the exact path on purpose (it is the exactness reference); a half-precision model
    on a GPU that misses the kernels is slower than it should be and is worth a warning.
    """
    triton = TRITON_BACKEND
    if device_type != "cuda" or dtype not in triton.dtypes:
        return None
    if head_dim not in triton.head_dims:
        return (
            f"head_dim {head_dim} is not supported by the Triton attention kernels "
            f"(head_dim {triton.head_dims}); attention runs on the exact PyTorch path"
        )
    return None
