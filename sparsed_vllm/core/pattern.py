"""SparseD pattern selection and the compact tile-pattern format (pure PyTorch, no vLLM).

Layout: one sequence is token-major, as vLLM keeps it: `q` is `[L, Hq, D]` (post-RoPE), `k`/`v` are
`[L, Hkv, D]`, with `Hq % Hkv == 0` (GQA: query head `h` reads KV head `h // (Hq // Hkv)`).

Compact pattern format, used by the kernels and the model code alike:
- a sequence of `L` tokens has `nb = ceil(L / block_size)` tiles on both axes (the last one may be
  partial);
- `kv_indices`: int32 `[Hq, nq, K]`, the kept key-tile indices of each query tile, ascending, padded
  with -1 beyond `kv_counts` (`nq == nb`; `K` = the largest count in the pattern);
- `kv_counts`: int32 `[Hq, nq]`, how many entries of `kv_indices` are valid;
- a varlen batch concatenates sequences along the query-tile axis (`q_tile_offsets`, int32 `[B+1]`)
  and pads `K` to the batch maximum; key-tile indices stay local to their own sequence.

Selection follows SparseD (arXiv 2509.24014) exactly: per query tile, fp32 softmax over the keys,
tile importance = mean probability over the full padded tile, top-k key tiles with
`k = max(1, int(n * select) + 1)`, done in isolation for prompt keys and for generation keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "PackedTilePattern",
    "TilePattern",
    "block_sparse_attention_gather",
    "block_sparse_attention_ref",
    "default_scale",
    "dense_attention_ref",
    "generation_start_tile",
    "llada_reference_scale",
    "num_kept_tiles",
    "num_tiles",
    "pack_patterns",
    "select_pattern",
    "tile_importance",
    "tile_mask_to_token_mask",
    "topk_tile_mask",
]


def default_scale(head_dim: int) -> float:
    """The softmax scale used by default for selection: `1 / sqrt(head_dim)`."""
    return 1.0 / math.sqrt(head_dim)


def llada_reference_scale(num_heads: int) -> float:
    """The scale the published LLaDA SparseD code scores with: `1 / sqrt(num_heads)`.

    A quirk of that code (1/sqrt(32) for LLaDA-8B instead of 1/sqrt(128)); pass it as `scale` to
    reproduce the official masks bit for bit. Its Dream code uses `default_scale(head_dim)`.
    """
    return 1.0 / math.sqrt(num_heads)


def num_tiles(seq_len: int, block_size: int) -> int:
    """Tiles along one axis of an `seq_len x seq_len` matrix: `ceil(seq_len / block_size)`."""
    return -(-seq_len // block_size)


def num_kept_tiles(n_tiles: int, select: float) -> int:
    """Top-k size for `n_tiles` candidate tiles: `max(1, int(n_tiles * select) + 1)`.

    Clamped to `n_tiles`, so `select` close to 1 keeps every tile instead of failing.
    """
    return min(n_tiles, max(1, int(n_tiles * select) + 1))


def generation_start_tile(seq_len: int, gen_length: int, block_size: int) -> int:
    """`g`: the first tile `t` with `seq_len - t * block_size <= gen_length`, else the last tile.

    Tiles `>= g` hold only generated tokens; a tile straddling the boundary counts as prompt.
    """
    nb = num_tiles(seq_len, block_size)
    for t in range(nb):
        if seq_len - t * block_size <= gen_length:
            return t
    return nb - 1


def tile_importance(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, key_begin: int = 0
) -> torch.Tensor:
    """Mean softmax probability of every (query tile, key tile) pair, in fp32.

    q: `[L, Hq, D]`, k: `[L, Hkv, D]`. The softmax runs over keys `[key_begin, L)` only
    (`key_begin` must be a tile boundary). Returns `[Hq, nq, nk]` with `nk` the tiles of that key
    range; each entry is the tile's probability sum divided by `block_size ** 2` (the mean over the
    full padded tile: padding counts as zero).
    """
    seq_len, n_heads, _ = q.shape
    if key_begin % block_size:
        raise ValueError(f"key_begin={key_begin} is not a multiple of block_size={block_size}")
    keys = _expand_kv(k[key_begin:], n_heads).float().transpose(0, 1)  # [Hq, Lk, D]
    n_keys = keys.shape[1]
    nq, nk = num_tiles(seq_len, block_size), num_tiles(n_keys, block_size)
    out = torch.empty(n_heads, nq, nk, dtype=torch.float32, device=q.device)
    # One query tile at a time: the reference never holds the whole L x L matrix.
    for i in range(nq):
        q_tile = q[i * block_size : (i + 1) * block_size].float().transpose(0, 1)  # [Hq, m, D]
        probs = torch.softmax(q_tile @ keys.transpose(1, 2) * scale, dim=-1)  # [Hq, m, Lk]
        probs = torch.nn.functional.pad(probs, (0, nk * block_size - n_keys))
        tile_sums = probs.view(n_heads, -1, nk, block_size).sum(dim=(1, 3))
        out[:, i] = tile_sums / (block_size * block_size)
    return out


def topk_tile_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the `k` largest entries along the last axis (ties: whatever `topk` picks)."""
    mask = torch.zeros_like(importance, dtype=torch.bool)
    return mask.scatter_(-1, importance.topk(k, dim=-1).indices, True)


def select_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    gen_length: int,
    block_size: int = 128,
    select: float = 0.3,
    scale: float | None = None,
) -> TilePattern:
    """SparseD isolated top-k selection for one sequence.

    q: `[L, Hq, D]`, k: `[L, Hkv, D]` (post-RoPE). `scale` defaults to `default_scale(D)`.
    Pass 1 ranks all key tiles and keeps only the prompt ones (`< g`); pass 2 ranks the generation
    tiles (`>= g`) under a softmax over generation keys alone; the pattern is their union.
    """
    _check_sequence(q, k)
    if not 0.0 <= select <= 1.0:
        raise ValueError(f"select must be in [0, 1], got {select}")
    seq_len = q.shape[0]
    scale = default_scale(q.shape[-1]) if scale is None else scale
    nb = num_tiles(seq_len, block_size)
    g = generation_start_tile(seq_len, gen_length, block_size)
    keep = torch.zeros(q.shape[1], nb, nb, dtype=torch.bool, device=q.device)
    if g > 0:
        prompt_rank = tile_importance(q, k, block_size, scale)
        keep[..., :g] = topk_tile_mask(prompt_rank, num_kept_tiles(nb, select))[..., :g]
    gen_rank = tile_importance(q, k, block_size, scale, key_begin=g * block_size)
    keep[..., g:] = topk_tile_mask(gen_rank, num_kept_tiles(nb - g, select))
    return TilePattern.from_dense_mask(keep, block_size, seq_len)


@dataclass
class TilePattern:
    """Kept key tiles of one sequence, per query head and query tile (compact format)."""

    kv_indices: torch.Tensor  # [Hq, nq, K] int32, ascending, -1 padded
    kv_counts: torch.Tensor  # [Hq, nq] int32
    block_size: int
    seq_len: int

    @property
    def num_tiles(self) -> int:
        return num_tiles(self.seq_len, self.block_size)

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, block_size: int, seq_len: int) -> TilePattern:
        """Compact a bool `[Hq, nq, nb]` tile mask (`nq == nb`)."""
        nb = num_tiles(seq_len, block_size)
        if mask.shape[-2:] != (nb, nb):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match {nb} tiles")
        counts = mask.sum(-1, dtype=torch.int32)
        width = max(int(counts.max()), 1) if counts.numel() else 1
        tile_ids = torch.arange(nb, dtype=torch.int32, device=mask.device)
        # Dropped tiles sort after every kept one, then become the -1 padding.
        keyed = torch.where(mask, tile_ids, nb).sort(dim=-1).values[..., :width]
        indices = torch.where(keyed == nb, -1, keyed).to(torch.int32)
        return cls(indices.contiguous(), counts, block_size, seq_len)

    @classmethod
    def full(cls, num_heads: int, seq_len: int, block_size: int, device=None) -> TilePattern:
        """The pattern that keeps every tile (sparse attention then equals dense attention)."""
        nb = num_tiles(seq_len, block_size)
        mask = torch.ones(num_heads, nb, nb, dtype=torch.bool, device=device)
        return cls.from_dense_mask(mask, block_size, seq_len)

    def to_dense_mask(self) -> torch.Tensor:
        """Bool `[Hq, nq, nb]`: True where the key tile is kept."""
        n_heads, nq, _ = self.kv_indices.shape
        mask = torch.zeros(
            n_heads, nq, self.num_tiles + 1, dtype=torch.bool, device=self.kv_indices.device
        )
        # -1 padding lands in the extra last column, which is dropped.
        cols = torch.where(self.kv_indices < 0, self.num_tiles, self.kv_indices).long()
        return mask.scatter_(-1, cols, True)[..., : self.num_tiles]

    def kept_fraction(self) -> float:
        """Fraction of the `Hq * nq * nb` tiles that are kept."""
        return float(self.kv_counts.sum()) / self.kv_counts.numel() / self.num_tiles


@dataclass
class PackedTilePattern:
    """Patterns of a varlen batch, concatenated along the query-tile axis."""

    kv_indices: torch.Tensor  # [Hq, sum(nq), K] int32, -1 padded
    kv_counts: torch.Tensor  # [Hq, sum(nq)] int32
    q_tile_offsets: torch.Tensor  # [B + 1] int32
    block_size: int
    seq_lens: list[int]

    def unpack(self) -> list[TilePattern]:
        """Split back into one `TilePattern` per sequence (padding trimmed to each one's `K`)."""
        out = []
        offsets = self.q_tile_offsets.tolist()
        for b, seq_len in enumerate(self.seq_lens):
            counts = self.kv_counts[:, offsets[b] : offsets[b + 1]]
            width = max(int(counts.max()), 1)
            indices = self.kv_indices[:, offsets[b] : offsets[b + 1], :width]
            out.append(TilePattern(indices, counts, self.block_size, seq_len))
        return out


def pack_patterns(patterns: list[TilePattern]) -> PackedTilePattern:
    """Concatenate per-sequence patterns (same heads and block size) into the varlen layout."""
    if not patterns:
        raise ValueError("pack_patterns needs at least one pattern")
    block_size = patterns[0].block_size
    if any(p.block_size != block_size for p in patterns):
        raise ValueError("all patterns of a batch must share one block_size")
    width = max(p.kv_indices.shape[-1] for p in patterns)
    padded = [
        torch.nn.functional.pad(p.kv_indices, (0, width - p.kv_indices.shape[-1]), value=-1)
        for p in patterns
    ]
    nqs = torch.tensor([0] + [p.kv_counts.shape[1] for p in patterns])
    return PackedTilePattern(
        kv_indices=torch.cat(padded, dim=1).contiguous(),
        kv_counts=torch.cat([p.kv_counts for p in patterns], dim=1).contiguous(),
        q_tile_offsets=nqs.cumsum(0).to(torch.int32).to(patterns[0].kv_counts.device),
        block_size=block_size,
        seq_lens=[p.seq_len for p in patterns],
    )


def tile_mask_to_token_mask(pattern: TilePattern) -> torch.Tensor:
    """Bool `[Hq, L, L]`: token (query, key) pairs that the pattern lets attend."""
    bs, seq_len = pattern.block_size, pattern.seq_len
    mask = pattern.to_dense_mask().repeat_interleave(bs, dim=1).repeat_interleave(bs, dim=2)
    return mask[:, :seq_len, :seq_len]


def block_sparse_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: TilePattern, scale: float
) -> torch.Tensor:
    """Block-sparse attention in fp32, softmax over the kept keys only.

    q: `[L, Hq, D]`, k/v: `[L, Hkv, D]` -> `[L, Hq, D]` in q's dtype.
    """
    _check_sequence(q, k)
    if pattern.seq_len != q.shape[0]:
        raise ValueError(f"pattern is for {pattern.seq_len} tokens, q has {q.shape[0]}")
    return _masked_attention(q, k, v, tile_mask_to_token_mask(pattern), scale)


def block_sparse_attention_gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: TilePattern, scale: float
) -> torch.Tensor:
    """Block-sparse attention that touches only the kept key tiles (the engine's CPU path).

    Same result as `block_sparse_attention_ref` up to rounding, in q's dtype, but its work and
    memory scale with the kept fraction: per query tile, every head's kept key tiles are gathered
    (padded to the widest head, padding masked) and attended in one SDPA call. The reference
    instead builds the full `[Hq, L, L]` score matrix (8.6 GB at 8k tokens and 32 heads).
    q: `[L, Hq, D]`, k/v: `[L, Hkv, D]` -> `[L, Hq, D]`.
    """
    _check_sequence(q, k)
    seq_len, n_heads, _ = q.shape
    if pattern.seq_len != seq_len:
        raise ValueError(f"pattern is for {pattern.seq_len} tokens, q has {seq_len}")
    bs = pattern.block_size
    keys = _expand_kv(k, n_heads).transpose(0, 1)  # [Hq, L, D]
    values = _expand_kv(v, n_heads).transpose(0, 1)
    queries = q.transpose(0, 1)  # [Hq, L, D]
    out = torch.empty_like(queries)
    offsets = torch.arange(bs, device=q.device)
    heads = torch.arange(n_heads, device=q.device)[:, None]
    for i in range(pattern.kv_indices.shape[1]):
        width = max(int(pattern.kv_counts[:, i].max()), 1)
        tiles = pattern.kv_indices[:, i, :width].long()  # [Hq, K], -1 padded
        tokens = (tiles.clamp(min=0)[..., None] * bs + offsets).flatten(1)  # [Hq, K * bs]
        valid = (tiles[..., None] >= 0).expand(-1, -1, bs).flatten(1) & (tokens < seq_len)
        tokens = tokens.clamp(max=seq_len - 1)
        rows = slice(i * bs, min((i + 1) * bs, seq_len))
        out[:, rows] = torch.nn.functional.scaled_dot_product_attention(
            queries[:, rows],
            keys[heads, tokens],
            values[heads, tokens],
            attn_mask=valid[:, None, :],
            scale=scale,
        )
    return out.transpose(0, 1)


def dense_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Bidirectional attention in fp32. q: `[L, Hq, D]`, k/v: `[L, Hkv, D]` -> `[L, Hq, D]`."""
    _check_sequence(q, k)
    return _masked_attention(q, k, v, None, scale)


def _masked_attention(q, k, v, mask, scale):
    n_heads = q.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, L, D]
    kf = _expand_kv(k, n_heads).float().transpose(0, 1)
    vf = _expand_kv(v, n_heads).float().transpose(0, 1)
    scores = qf @ kf.transpose(1, 2) * scale  # [Hq, L, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(0, 1).to(q.dtype)


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat KV heads `[L, Hkv, D] -> [L, Hq, D]` so query head h reads KV head h // group."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def _check_sequence(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"expected [L, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on L or D")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
