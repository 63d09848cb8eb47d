"""Every dense backend that runs on this GPU, against the fp32 reference (GPU)."""

import pytest
import torch
from sparsed_vllm.kernels import dense_attention, dense_backends

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n_kv", [4, 1], ids=["MHA", "GQA4"])
@pytest.mark.parametrize(
    "head_dim,dtype", [(64, torch.float16), (128, torch.bfloat16)], ids=["D64-fp16", "D128-bf16"]
)
def test_dense_backends(head_dim, dtype, n_kv, assert_close):
    lens = [1, 300, 1000]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens), 4, head_dim, generator=gen).to("cuda", dtype)
    k, v = (
        torch.randn(sum(lens), n_kv, head_dim, generator=gen).to("cuda", dtype) for _ in range(2)
    )
    cu = torch.tensor([0, *lens]).cumsum(0).to(device="cuda", dtype=torch.int32)
    want, want_lse = dense_attention(q, k, v, cu, 1000, 0.1, backend="math", return_lse=True)
    backends = dense_backends("cuda", dtype, head_dim)
    assert backends, "no dense backend works on this GPU"
    for name in backends:
        out, lse = dense_attention(q, k, v, cu, 1000, 0.1, backend=name, return_lse=True)
        assert_close(name, want, out, 1e-2)
        assert_close(f"{name}-lse", want_lse, lse, 1e-4)
