"""Host-side plan of SparseD attention over cached windows (no Triton: the executor builds these
once per step, or once per block, and every layer's kernel call reuses them).

- `WindowPlan`: each window cut into work items, rows of one query tile, at most `block_q` rows.
- `window_lists`: the kept key tiles the kernel walks for a window's query tiles, per KV head
  group. With GQA the query heads of a group share one list, the union of their kept tiles, and
  a bit per (tile, head) says which of them keep it: each key tile is read once per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsed_vllm.core.pattern import TilePattern


@dataclass(frozen=True)
class WindowPlan:
    """Work items of one call: rows `[first, end)` of window `seq` in its packed query tile."""

    items: torch.Tensor  # [n, 4] int32 on the device: (seq, first row, end row, packed tile)
    num_items: int
    tiles: list[tuple[int, int]]  # each window's query tiles [first, end)
    block_q: int
    tile: int


def window_items(
    q_lens: list[int], q_starts: list[int], tile: int, block_q: int
) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]:
    """Cut each window into items of rows in one query tile, at most `block_q` rows each.

    Returns the items (sequence, first row, end row, packed tile; rows relative to the window,
    packed tiles numbered over the batch's windows) and each window's query tiles [first, end).
    """
    items, tiles, packed = [], [], 0
    for b, (rows, start) in enumerate(zip(q_lens, q_starts, strict=True)):
        if rows == 0:
            tiles.append((0, 0))
            continue
        first, end = start // tile, (start + rows - 1) // tile + 1
        tiles.append((first, end))
        for t in range(first, end):
            lo, hi = max(start, t * tile) - start, min(start + rows, (t + 1) * tile) - start
            for r in range(lo, hi, block_q):
                items.append((b, r, min(r + block_q, hi), packed + t - first))
        packed += end - first
    return items, tiles


def plan_windows(
    q_lens: list[int], q_starts: list[int], tile: int, block_q: int, device
) -> WindowPlan:
    items, tiles = window_items(q_lens, q_starts, tile, block_q)
    table = torch.tensor(items, dtype=torch.int32).reshape(-1, 4).to(device)
    return WindowPlan(table, len(items), tiles, block_q, tile)


@dataclass(frozen=True)
class WindowLists:
    """Kept key tiles per (head group, window query tile): what one window's kernel walks."""

    kv_indices: torch.Tensor  # [Hg, nt, K] int32, ascending, -1 padded
    kv_counts: torch.Tensor  # [Hg, nt] int32
    head_bits: torch.Tensor | None  # [Hg, nt, K] int32: bit h set if head h of the group keeps it


def window_lists(pattern: TilePattern, first: int, end: int, n_kv: int) -> WindowLists:
    """The lists of query tiles `[first, end)`: the pattern's own per head without GQA (views, no
    copy); under GQA, per KV head the union of its query heads' kept tiles with their head bits."""
    indices, counts = pattern.kv_indices[:, first:end], pattern.kv_counts[:, first:end]
    n_heads, n_tiles, width = indices.shape
    group = n_heads // n_kv
    if group == 1:
        return WindowLists(indices, counts, None)
    nb = pattern.num_tiles
    columns = torch.where(indices < 0, nb, indices).long()
    kept = torch.zeros(n_heads, n_tiles, nb + 1, dtype=torch.int32, device=indices.device)
    kept.scatter_(-1, columns, 1)
    shifts = torch.arange(group, dtype=torch.int32, device=indices.device).view(1, group, 1, 1)
    bits = (kept.view(n_kv, group, n_tiles, nb + 1) << shifts).sum(1, dtype=torch.int32)
    bits[..., nb] = 0  # the padding column
    union = bits > 0
    width = min(nb, group * width)  # a bound on the union's size, known without a sync
    tile_ids = torch.arange(nb + 1, dtype=torch.int32, device=indices.device)
    keyed = torch.where(union, tile_ids, nb).sort(dim=-1).values[..., :width]
    head_bits = bits.gather(-1, keyed.long())
    union_indices = torch.where(keyed == nb, -1, keyed).to(torch.int32)
    return WindowLists(union_indices, union.sum(-1, dtype=torch.int32), head_bits)


def pack_lists(lists: list[WindowLists]) -> WindowLists:
    """Several windows' lists along the tile axis (K padded to the widest)."""
    if len(lists) == 1:
        return lists[0]
    width = max(w.kv_indices.shape[-1] for w in lists)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)

    indices = torch.cat([pad(w.kv_indices, -1) for w in lists], 1)
    counts = torch.cat([w.kv_counts for w in lists], 1)
    bits = None
    if lists[0].head_bits is not None:
        bits = torch.cat([pad(w.head_bits, 0) for w in lists], 1)
    return WindowLists(indices, counts, bits)
