"""One step's attention, stage by stage: the executor behind the attention backend (no vLLM).

A step's batch holds two kinds of sequences, full ones first:
- full sequences (exact decoding, and the refresh step of a cached request): attention over the
  sequence's own keys;
- cached windows (the later steps of a cached request): the window's queries against every key of
  the sequence, read from its pages of the KV cache after the window's fresh keys and values were
  written there.
Each sequence is at a SparseD stage (dense, select, sparse), which gives five kinds of work:
dense, select, sparse, cached-dense and cached-sparse. `AttentionBatch.build` sorts the
sequences into groups once per step (on the host); `staged_attention` then makes one varlen call
per group in every layer. A group is one kind with one tile size and `select` (a kernel call
takes one of each); a caller that lays each kind out contiguously (the model runner does) gets
views, any other layout is gathered.

Dispatch reads the capability table (`core.capabilities.select_backend`), as request validation
does: the Triton kernels where they run, the exact PyTorch path everywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparsed_vllm.core import pattern as ref
from sparsed_vllm.core.capabilities import TRITON, select_backend
from sparsed_vllm.core.pattern import PackedTilePattern, TilePattern, num_tiles
from sparsed_vllm.core.sparsed import DENSE, SELECT, SPARSE, PatternStore

CACHED_DENSE = "cached-dense"
CACHED_SPARSE = "cached-sparse"
# Group order within a step: full kinds, then cached ones.
KINDS = (DENSE, SELECT, SPARSE, CACHED_DENSE, CACHED_SPARSE)


@dataclass(frozen=True)
class SequenceStage:
    """SparseD state of one sequence of the batch for this step."""

    stage: str  # dense | select | sparse
    key: tuple[int, int]  # (pattern slot, sequence index within the request)
    gen_length: int
    block_size: int = 0
    select: float = 0.0


@dataclass(frozen=True)
class CachedWindow:
    """A cached sequence's window, as the host knows it."""

    rows: int  # query rows fed this step
    start: int  # position of the first one
    kv_len: int  # every key of the sequence
    pages: torch.Tensor  # [n] int: the sequence's KV pages, in order
    stage: SequenceStage


@dataclass
class KVWrite:
    """Batch rows whose keys and values go to the KV cache, and their slots (page * size + row)."""

    rows: torch.Tensor | None  # [n] int64; None: every row of the batch
    slots: torch.Tensor  # [n] int64


@dataclass
class Group:
    """Sequences of one kind (and one tile size / select) that one kernel call covers."""

    kind: str
    seqs: list[int]  # indices into the full sequences, or into the cached windows
    rows: slice | torch.Tensor  # their rows of the batch: a slice, or gathered row indices
    stages: list[SequenceStage]
    seq_lens: list[int]  # rows per sequence
    cu_seqlens: torch.Tensor  # [n + 1] int32, over the group's rows
    # Full sparse groups: tiles per sequence, packed (the kernel's q_tile_offsets).
    q_tile_offsets: torch.Tensor | None = None
    # Cached groups.
    q_starts: list[int] = field(default_factory=list)
    kv_lens: torch.Tensor | None = None  # [n] int32
    max_kv_len: int = 0
    block_table: torch.Tensor | None = None  # [n, max_pages] int32
    # What the kernels derive once per step and reuse in every layer (e.g. a window plan).
    memo: dict = field(default_factory=dict)

    @property
    def max_seqlen(self) -> int:
        return max(self.seq_lens, default=0)


@dataclass
class AttentionBatch:
    """One step's batch: full sequences laid end to end, then the cached windows, and the groups
    each layer's attention runs."""

    seq_lens: list[int]  # full sequences (prompt + canvas, plus CFG copies)
    groups: list[Group]
    patterns: PatternStore = field(default_factory=PatternStore)
    selection_scale: float | None = None
    kv_write: KVWrite | None = None
    num_cached_rows: int = 0
    # Kernels of the sparse and the dense cached groups on a GPU (`RunnerConfig.sparse_kernel`,
    # `RunnerConfig.cached_kernel`).
    sparse_kernel: str = "triton"
    cached_kernel: str = "triton"

    @property
    def num_full_tokens(self) -> int:
        return sum(self.seq_lens)

    @classmethod
    def build(
        cls,
        seq_lens: list[int],
        device: torch.device,
        stages: list[SequenceStage] | None = None,
        patterns: PatternStore | None = None,
        selection_scale: float | None = None,
        cached: list[CachedWindow] | None = None,
        kv_write: KVWrite | None = None,
        sparse_kernel: str = "triton",
        cached_kernel: str = "triton",
    ) -> AttentionBatch:
        """Group the sequences; `stages` None: every full sequence is dense."""
        stages = stages or [SequenceStage(DENSE, (-1, i), 0) for i in range(len(seq_lens))]
        cached = cached or []
        full_starts = _starts(seq_lens, 0)
        groups = [
            _full_group(kind, members, seq_lens, full_starts, stages, device)
            for kind, members in _partition([(s.stage, s) for s in stages])
        ]
        window_starts = _starts([w.rows for w in cached], sum(seq_lens))
        kinds = [
            (CACHED_SPARSE if w.stage.stage == SPARSE else CACHED_DENSE, w.stage) for w in cached
        ]
        groups += [
            _cached_group(kind, members, cached, window_starts, device)
            for kind, members in _partition(kinds)
        ]
        return cls(
            seq_lens=seq_lens,
            groups=groups,
            patterns=patterns if patterns is not None else PatternStore(),
            selection_scale=selection_scale,
            kv_write=kv_write,
            num_cached_rows=sum(w.rows for w in cached),
            sparse_kernel=sparse_kernel,
            cached_kernel=cached_kernel,
        )


def _starts(lengths: list[int], offset: int) -> list[int]:
    out = []
    for n in lengths:
        out.append(offset)
        offset += n
    return out


def _partition(kinds: list[tuple[str, SequenceStage]]) -> list[tuple[str, list[int]]]:
    """Indices by (kind, tile, select), groups in KINDS order, members in batch order."""
    found: dict[tuple, list[int]] = {}
    for i, (kind, stage) in enumerate(kinds):
        tiled = kind in (SELECT, SPARSE, CACHED_SPARSE)
        key = (KINDS.index(kind), stage.block_size if tiled else 0, stage.select if tiled else 0)
        found.setdefault(key, []).append(i)
    return [(KINDS[key[0]], found[key]) for key in sorted(found)]


def _rows(
    members: list[int], starts: list[int], lengths: list[int], device
) -> slice | torch.Tensor:
    """The members' rows: one slice when they lie end to end, else an index of every row."""
    if all(b == a + 1 for a, b in zip(members, members[1:], strict=False)):
        first, last = members[0], members[-1]
        return slice(starts[first], starts[last] + lengths[last])
    index = [torch.arange(starts[i], starts[i] + lengths[i]) for i in members]
    return torch.cat(index).to(device)


def _cu(lengths: list[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return cu.to(device)


def _full_group(kind, members, seq_lens, starts, stages, device) -> Group:
    lens = [seq_lens[i] for i in members]
    group = Group(
        kind=kind,
        seqs=members,
        rows=_rows(members, starts, seq_lens, device),
        stages=[stages[i] for i in members],
        seq_lens=lens,
        cu_seqlens=_cu(lens, device),
    )
    if kind == SPARSE:
        tiles = [num_tiles(n, group.stages[0].block_size) for n in lens]
        group.q_tile_offsets = _cu(tiles, device)
    return group


def _cached_group(kind, members, windows, starts, device) -> Group:
    chosen = [windows[i] for i in members]
    lens = [w.rows for w in chosen]
    table = torch.nn.utils.rnn.pad_sequence([w.pages for w in chosen], batch_first=True)
    return Group(
        kind=kind,
        seqs=members,
        rows=_rows(members, starts, [w.rows for w in windows], device),
        stages=[w.stage for w in chosen],
        seq_lens=lens,
        cu_seqlens=_cu(lens, device),
        q_starts=[w.start for w in chosen],
        kv_lens=torch.tensor([w.kv_len for w in chosen], dtype=torch.int32).to(device),
        max_kv_len=max(w.kv_len for w in chosen),
        block_table=table.to(device, torch.int32),
    )


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, write: KVWrite):
    """Store rows of k/v `[N, Hkv, D]` into a layer's cache `[2, pages, page_size, Hkv, D]`."""
    if write.rows is not None:
        key, value = key[write.rows], value[write.rows]
    flat = kv_cache.flatten(1, 2)  # [2, pages * page_size, Hkv, D]
    flat[0].index_copy_(0, write.slots, key)
    flat[1].index_copy_(0, write.slots, value)


def use_kernels(q: torch.Tensor) -> bool:
    """Triton/cuDNN kernels where the capability table picks them (the table request validation
    reads), the exact PyTorch path everywhere else."""
    return select_backend(q.device.type, q.dtype, q.shape[-1]).name == TRITON


def staged_attention(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor | None,
    batch: AttentionBatch,
    scale: float,
    output: torch.Tensor,
) -> torch.Tensor:
    """This layer's attention for the whole step, one call per group. query `[N, Hq, D]`,
    key/value `[N, Hkv, D]` (full rows, then window rows), kv_cache `[2, pages, page, Hkv, D]`
    (cached decoding) -> output `[N, Hq, D]`. Selection steps store their patterns in
    `batch.patterns` under (sequence key, layer)."""
    if batch.kv_write is not None:
        write_kv(kv_cache, key, value, batch.kv_write)
    if use_kernels(query):
        ops = _KernelOps(scale, batch.sparse_kernel, batch.cached_kernel)
    else:
        ops = _ExactOps(scale)
    for group in batch.groups:
        cached = group.kind in (CACHED_DENSE, CACHED_SPARSE)
        rows = group.rows
        q = query[rows]
        if cached:
            k_cache, v_cache = kv_cache[0], kv_cache[1]
            if group.kind == CACHED_DENSE:
                out = ops.cached_dense(q, k_cache, v_cache, group)
            else:
                out = ops.cached_sparse(q, k_cache, v_cache, group, batch.patterns, layer)
        else:
            k, v = key[rows], value[rows]
            if group.kind == DENSE:
                out = ops.dense(q, k, v, group)
            elif group.kind == SPARSE:
                out = ops.sparse(q, k, v, group, batch.patterns, layer)
            else:
                out, patterns = ops.select(q, k, v, group, batch.selection_scale)
                for stage, pattern in zip(group.stages, patterns, strict=True):
                    batch.patterns.put(stage.key, layer, pattern)
        output[rows] = out
    return output


class _ExactOps:
    """Plain PyTorch: any device and dtype, exact in fp32 (one sequence at a time inside)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def _each(self, q, k, v, group, attend: Callable) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for b, n in enumerate(group.seq_lens):
            rows = slice(start, start + n)
            out[rows] = attend(b, q[rows], k[rows], v[rows])
            start += n
        return out

    def dense(self, q, k, v, group):
        return varlen_dense_attention(q, k, v, group.seq_lens, self.scale)

    def select(self, q, k, v, group, selection_scale):
        out = varlen_dense_attention(q, k, v, group.seq_lens, self.scale)
        patterns, start = [], 0
        for n, stage in zip(group.seq_lens, group.stages, strict=True):
            rows = slice(start, start + n)
            patterns.append(
                ref.select_pattern(
                    q[rows],
                    k[rows],
                    stage.gen_length,
                    stage.block_size,
                    stage.select,
                    selection_scale,
                )
            )
            start += n
        return out, patterns

    def sparse(self, q, k, v, group, store: PatternStore, layer: int):
        patterns = [store.get(s.key, layer) for s in group.stages]
        return self._each(
            q,
            k,
            v,
            group,
            lambda b, qs, ks, vs: ref.block_sparse_attention_gather(
                qs, ks, vs, patterns[b], self.scale
            ),
        )

    def cached_dense(self, q, k_cache, v_cache, group):
        from sparsed_vllm.kernels import cached_attention_ref

        return cached_attention_ref(
            q, k_cache, v_cache, group.cu_seqlens, group.kv_lens, group.block_table, self.scale
        )

    def cached_sparse(self, q, k_cache, v_cache, group, store, layer):
        from sparsed_vllm.kernels import cached_attention_ref

        patterns = [store.get(s.key, layer) for s in group.stages]
        return cached_attention_ref(
            *(q, k_cache, v_cache, group.cu_seqlens, group.kv_lens, group.block_table),
            self.scale,
            patterns,
            group.q_starts,
        )


class _KernelOps:
    """The Triton kernels (and the fastest dense kernel), one varlen call per group."""

    def __init__(
        self, scale: float, sparse_kernel: str = "triton", cached_kernel: str = "triton"
    ) -> None:
        self.scale = scale
        self.sparse_kernel = sparse_kernel
        self.cached_kernel = cached_kernel

    def dense(self, q, k, v, group, return_lse=False):
        from sparsed_vllm.kernels import dense_attention

        return dense_attention(
            q, k, v, group.cu_seqlens, group.max_seqlen, self.scale, return_lse=return_lse
        )

    def select(self, q, k, v, group, selection_scale):
        from sparsed_vllm.kernels import fused_select_pattern

        # At the attention's own scale, the dense call's log-sum-exp replaces the selection's
        # first pass over all keys (about half its cost).
        if math.isclose(selection_scale, self.scale, rel_tol=1e-6):
            out, lse = self.dense(q, k, v, group, return_lse=True)
        else:
            out, lse = self.dense(q, k, v, group), None
        first = group.stages[0]
        packed = fused_select_pattern(
            *(q, k, group.cu_seqlens, [s.gen_length for s in group.stages]),
            first.block_size,
            first.select,
            selection_scale,
            lse=lse,
        )
        return out, packed.unpack()

    def sparse(self, q, k, v, group, store: PatternStore, layer: int):
        from sparsed_vllm.kernels.block_sparse import fa4

        tile = group.stages[0].block_size
        if self.sparse_kernel == "fa4" and fa4.fa4_runs(tile, q.shape[-1], q.device):
            # FA4's lists of each pattern: built once, kept with the pattern's slot.
            lists = [
                store.derived(s.key, layer, "fa4", fa4.prepare_fa4_sequence) for s in group.stages
            ]
            pattern = fa4.fa4_batch_pattern(lists, group.seq_lens, tile)
            return fa4.fa4_sparse_attention(q, k, v, group.cu_seqlens, pattern, self.scale)
        from sparsed_vllm.kernels import sparse_attention

        patterns = [store.get(s.key, layer) for s in group.stages]
        return sparse_attention(q, k, v, group.cu_seqlens, _pack(patterns, group), self.scale)

    def cached_dense(self, q, k_cache, v_cache, group):
        from sparsed_vllm.kernels.cached import fa3

        args = (q, k_cache, v_cache, group.cu_seqlens, group.kv_lens, group.block_table)
        if self.cached_kernel == "fa3" and fa3.fa3_runs(q):
            return fa3.fa3_cached_attention(
                *args, self.scale, max_seqlen_q=group.max_seqlen, max_kv_len=group.max_kv_len
            )
        from sparsed_vllm.kernels import cached_attention

        return cached_attention(*args, self.scale, max_kv_len=group.max_kv_len)

    def cached_sparse(self, q, k_cache, v_cache, group, store, layer):
        from sparsed_vllm.kernels import cached_sparse_attention
        from sparsed_vllm.kernels.cached import sparse, windows

        n_kv = k_cache.shape[2]
        pack = sparse.head_pack(q.shape[1], n_kv)
        tile = group.stages[0].block_size
        if "plan" not in group.memo:
            # The windows' work items: once per step, for every layer.
            block_q = sparse.default_block_m(group.max_seqlen, pack) // pack
            group.memo["plan"] = windows.plan_windows(
                group.seq_lens, group.q_starts, tile, block_q, q.device
            )
        plan = group.memo["plan"]
        # Each window's kept-tile lists: once per block (they change with the window's tiles).
        lists = [
            store.derived(
                stage.key, layer, tiles, lambda p, t=tiles: windows.window_lists(p, *t, n_kv)
            )
            for stage, tiles in zip(group.stages, plan.tiles, strict=True)
            if tiles[1] > tiles[0]
        ]
        patterns = [store.get(s.key, layer) for s in group.stages]
        return cached_sparse_attention(
            *(q, k_cache, v_cache, group.cu_seqlens, group.kv_lens, group.block_table),
            self.scale,
            patterns,
            group.q_starts,
            group.seq_lens,
            plan=plan,
            lists=windows.pack_lists(lists),
        )


def _pack(patterns: list[TilePattern], group: Group) -> PackedTilePattern:
    """The group's patterns in the varlen layout; one pattern is used as it is (no copy)."""
    indices, counts = patterns[0].kv_indices, patterns[0].kv_counts
    if len(patterns) > 1:
        width = max(p.kv_indices.shape[-1] for p in patterns)
        indices = torch.cat(
            [F.pad(p.kv_indices, (0, width - p.kv_indices.shape[-1]), value=-1) for p in patterns],
            dim=1,
        )
        counts = torch.cat([p.kv_counts for p in patterns], dim=1)
    return PackedTilePattern(
        indices, counts, group.q_tile_offsets, patterns[0].block_size, group.seq_lens
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
