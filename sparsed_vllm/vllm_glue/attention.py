"""Attention backend for diffusion LMs: bidirectional varlen attention, with or without a KV cache.

Why it exists: vLLM's attention layers find their per-step metadata through the forward context
and call `impl.forward(layer, q, k, v, kv_cache, metadata, output)`. The diffusion model runner
builds `DiffusionAttentionMetadata` itself. A step's batch holds two kinds of sequences, laid out
full ones first:
- full sequences (exact decoding, and the refresh step of a cached request): attention over the
  sequence's own keys, dense or at its SparseD stage;
- cached sequences (the later steps of a cached request): the fed window's queries against all
  keys of the sequence, read from its pages of the KV cache after the window's fresh keys and
  values were written there.
Rows listed in `kv_write` (a refresh's whole sequence, a cached step's window) are written to the
layer's KV cache first. The models pass this backend to their `DiffusionAttention` layers
directly, so it is used on every platform (the CPU platform would otherwise always pick CPU_ATTN).
vLLM internals used (0.32): AttentionBackend/AttentionImpl signatures, Attention.__init__'s use of
`get_name()` as an AttentionBackendEnum member, the layer's `kv_cache` attribute (bound by the
diffusion model runner, passed to `impl.forward` by vLLM's attention op).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionBackend, AttentionImpl, AttentionType

from sparsed_vllm.core import pattern as ref
from sparsed_vllm.core.capabilities import TRITON, select_backend
from sparsed_vllm.core.sparsed import DENSE, SPARSE, PatternStore

BACKEND_NAME = "CUSTOM"


@dataclass
class SequenceSparsity:
    """SparseD state of one sequence of the batch for this step."""

    stage: str  # dense | select | sparse
    key: tuple[int, int]  # (pattern slot, sequence index within the request)
    gen_length: int
    block_size: int
    select: float


@dataclass
class CachedBatch:
    """The cached sequences of a step: their window rows, after the full ones in the batch."""

    cu_seqlens_q: torch.Tensor  # [Bc + 1] int32: window rows per sequence
    kv_lens: torch.Tensor  # [Bc] int32: every key of the sequence
    block_table: torch.Tensor  # [Bc, max_pages] int32: the sequence's KV pages, in order
    max_kv_len: int
    q_starts: list[int]  # position of each window's first row
    # Per cached sequence; None when every one is dense this step.
    sparsity: list[SequenceSparsity] | None = None


@dataclass
class KVWrite:
    """Batch rows whose keys and values go to the KV cache, and their slots (page * size + row)."""

    rows: torch.Tensor | None  # [n] int64; None: every row of the batch
    slots: torch.Tensor  # [n] int64


@dataclass
class DiffusionAttentionMetadata:
    """One step's batch: full sequences laid end to end, then the cached windows."""

    seq_lens: list[int]  # full sequences (prompt + canvas, plus CFG copies)
    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int
    # Per full sequence; None when every full sequence is dense this step.
    sparsity: list[SequenceSparsity] | None = None
    patterns: PatternStore = field(default_factory=PatternStore)
    selection_scale: float | None = None
    cached: CachedBatch | None = None
    kv_write: KVWrite | None = None

    @property
    def num_full_tokens(self) -> int:
        return sum(self.seq_lens)

    @classmethod
    def build(
        cls,
        seq_lens: list[int],
        device: torch.device,
        sparsity: list[SequenceSparsity] | None = None,
        patterns: PatternStore | None = None,
        selection_scale: float | None = None,
        cached: CachedBatch | None = None,
        kv_write: KVWrite | None = None,
    ) -> DiffusionAttentionMetadata:
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), 0)
        if sparsity is not None and all(s.stage == DENSE for s in sparsity):
            sparsity = None
        return cls(
            seq_lens=seq_lens,
            cu_seqlens=cu.to(device),
            max_seqlen=max(seq_lens, default=0),
            sparsity=sparsity,
            patterns=patterns if patterns is not None else PatternStore(),
            selection_scale=selection_scale,
            cached=cached,
            kv_write=kv_write,
        )


def varlen_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], scale: float
) -> torch.Tensor:
    """Exact bidirectional attention per sequence. q: [N, Hq, D], k/v: [N, Hkv, D] -> [N, Hq, D]"""
    out = torch.empty_like(q)
    start = 0
    for length in seq_lens:
        end = start + length
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(
            qs, ks, vs, scale=scale, enable_gqa=ks.shape[0] != qs.shape[0]
        )
        out[start:end] = o.transpose(0, 1)
        start = end
    return out


def _use_kernels(q: torch.Tensor) -> bool:
    """Triton/cuDNN kernels where the capability table picks them (the same table request
    validation reads), the exact PyTorch path everywhere else."""
    return select_backend(q.device.type, q.dtype, q.shape[-1]).name == TRITON


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, write: KVWrite):
    """Store rows of k/v `[N, Hkv, D]` into a layer's cache `[2, pages, page_size, Hkv, D]`."""
    if write.rows is not None:
        key, value = key[write.rows], value[write.rows]
    flat = kv_cache.flatten(1, 2)  # [2, pages * page_size, Hkv, D]
    flat[0].index_copy_(0, write.slots, key)
    flat[1].index_copy_(0, write.slots, value)


class DiffusionAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.ENCODER_ONLY,
        kv_sharing_target_layer_name: str | None = None,
    ) -> None:
        if attn_type != AttentionType.ENCODER_ONLY:
            raise ValueError(f"diffusion attention is bidirectional only, got {attn_type}")
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise ValueError("alibi, sliding windows and soft-capping are not supported")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: DiffusionAttentionMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None:
            # Shape-only passes (profiling) carry no batch description.
            output.zero_()
            return output
        if attn_metadata.kv_write is not None:
            write_kv(kv_cache, key, value, attn_metadata.kv_write)
        full = attn_metadata.num_full_tokens
        if full:
            q, k, v = query[:full], key[:full], value[:full]
            output[:full] = self._full(layer.layer_index, q, k, v, attn_metadata)
        if attn_metadata.cached is not None:
            output[full:] = self._cached(layer.layer_index, query[full:], kv_cache, attn_metadata)
        return output

    def _full(self, layer_index, q, k, v, metadata: DiffusionAttentionMetadata) -> torch.Tensor:
        """Full sequences: dense in one varlen call, or one sequence at a time by stage."""
        if metadata.sparsity is None:
            return self._dense(q, k, v, metadata)
        out = torch.empty_like(q)
        start = 0
        for seq_len, seq in zip(metadata.seq_lens, metadata.sparsity, strict=True):
            end = start + seq_len
            qs, ks, vs = q[start:end], k[start:end], v[start:end]
            out[start:end] = self._staged(layer_index, qs, ks, vs, seq, metadata)
            start = end
        return out

    def _cached(self, layer_index, q, kv_cache, metadata: DiffusionAttentionMetadata):
        """Window queries `[Tq, Hq, D]` against every key of their sequences' pages, or, at a
        SparseD sparse stage, against the kept key tiles of each row's query tile."""
        batch = metadata.cached
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        args = (q, k_cache, v_cache, batch.cu_seqlens_q, batch.kv_lens, batch.block_table)
        if batch.sparsity is not None:
            from sparsed_vllm.kernels import cached_attention_ref

            patterns = [
                metadata.patterns.get(s.key, layer_index) if s.stage == SPARSE else None
                for s in batch.sparsity
            ]
            return cached_attention_ref(*args, self.scale, patterns, batch.q_starts)
        if _use_kernels(q):
            from sparsed_vllm.kernels import cached_attention

            return cached_attention(*args, self.scale, max_kv_len=batch.max_kv_len)
        from sparsed_vllm.kernels import cached_attention_ref

        return cached_attention_ref(*args, self.scale)

    def _dense(self, q, k, v, metadata: DiffusionAttentionMetadata) -> torch.Tensor:
        if _use_kernels(q):
            from sparsed_vllm.kernels import dense_attention

            return dense_attention(q, k, v, metadata.cu_seqlens, metadata.max_seqlen, self.scale)
        return varlen_dense_attention(q, k, v, metadata.seq_lens, self.scale)

    def _staged(self, layer_index, q, k, v, seq: SequenceSparsity, metadata) -> torch.Tensor:
        """One sequence at its SparseD stage. q: [L, Hq, D], k/v: [L, Hkv, D] -> [L, Hq, D]"""
        one = DiffusionAttentionMetadata.build([q.shape[0]], q.device)
        if seq.stage == SPARSE:
            pattern = metadata.patterns.get(seq.key, layer_index)
            return self._sparse(q, k, v, one, pattern)
        if seq.stage == DENSE:
            return self._dense(q, k, v, one)
        out, pattern = self._dense_and_select(q, k, v, one, seq, metadata.selection_scale)
        metadata.patterns.put(seq.key, layer_index, pattern)
        return out

    def _dense_and_select(self, q, k, v, one, seq: SequenceSparsity, scale: float):
        """This step's dense output and the selected pattern (from the same post-RoPE q, k)."""
        if not _use_kernels(q):
            out = self._dense(q, k, v, one)
            return out, ref.select_pattern(q, k, seq.gen_length, seq.block_size, seq.select, scale)
        from sparsed_vllm.kernels import dense_attention, fused_select_pattern

        # At the attention's own scale, the dense call's log-sum-exp replaces the selection's
        # first pass over all keys (about half its cost).
        if math.isclose(scale, self.scale, rel_tol=1e-6):
            out, lse = dense_attention(
                q, k, v, one.cu_seqlens, one.max_seqlen, self.scale, return_lse=True
            )
        else:
            out, lse = self._dense(q, k, v, one), None
        pattern = fused_select_pattern(
            q, k, one.cu_seqlens, [seq.gen_length], seq.block_size, seq.select, scale, lse=lse
        )
        return out, pattern

    def _sparse(self, q, k, v, one, pattern) -> torch.Tensor:
        if _use_kernels(q):
            from sparsed_vllm.kernels import sparse_attention

            return sparse_attention(q, k, v, one.cu_seqlens, pattern, self.scale)
        return ref.block_sparse_attention_gather(q, k, v, pattern, self.scale)


class DiffusionAttentionBackend(AttentionBackend):
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return DiffusionAttentionImpl

    @staticmethod
    def get_builder_cls():
        # The diffusion runner builds metadata directly; vLLM's builder path is never taken.
        raise NotImplementedError("DiffusionAttentionBackend has no metadata builder")

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, *args, **kwargs):
        """Per layer: keys and values of every page, `[2, pages, page_size, Hkv, D]`."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.ENCODER_ONLY


class DiffusionAttention(Attention):
    """Bidirectional attention layer. vLLM sees no KV cache in it (`get_kv_cache_spec` is None):
    the diffusion model runner declares and binds the cache of cached decoding itself."""

    def __init__(self, num_heads: int, head_size: int, scale: float, **kwargs) -> None:
        super().__init__(
            num_heads=num_heads,
            head_size=head_size,
            scale=scale,
            attn_backend=DiffusionAttentionBackend,
            attn_type=AttentionType.ENCODER_ONLY,
            **kwargs,
        )
        # Patterns are stored per layer: the index comes from the layer's name.
        self.layer_index = extract_layer_index(kwargs["prefix"])

    def get_kv_cache_spec(self, vllm_config):
        return None
