"""Cached-step SparseD attention: `cached_sparse_attention` (kept key tiles only) vs the dense
`cached_attention` over every key, same paged cache.

One sequence, a window of 32 query rows at the end of the canvas (256 new tokens, prompt before
them), 16k / 32k / 64k keys, tiles and pages of 128, bf16, LLaDA-8B (Hq = Hkv = 32) and Dream-7B
(Hq = 28, Hkv = 4) heads of 128. Patterns keep what SparseD's selection keeps at each `select`
(`num_kept_tiles` of the prompt tiles and of the generation tiles), chosen at random per head and
query tile. Reports milliseconds (median of `do_bench`; the window plan and kept-tile lists built
beforehand, as the engine builds them once per step / block), the kept fraction, the speed-up
over the dense kernel, GB/s of the kept K/V read (each KV head's union of kept tiles once) and
the relative RMS error against the PyTorch reference.

    python benchmarks/bench_cached_sparse.py --out cached_sparse.json
"""

import argparse
import datetime
import json

import torch
from bench_cached_attention import DEVICE, MODELS, _try, bench_ms, make_batch
from sparsed_vllm.kernels import cached_attention, cached_attention_ref, cached_sparse_attention
from sparsed_vllm.kernels.cached import sparse as sparse_mod
from sparsed_vllm.kernels.cached import windows
from tqdm import tqdm

from sparsed_vllm.core.pattern import (
    TilePattern,
    generation_start_tile,
    num_kept_tiles,
    num_tiles,
)

GEN, ROWS, TILE = 256, 32, 128


def selected_pattern(n_heads, kv_len, select, seed):
    """A pattern with SparseD's kept-tile counts: top-k of the prompt tiles (< g) plus top-k of
    the generation tiles, at random positions."""
    gen = torch.Generator().manual_seed(seed)
    nb, g = num_tiles(kv_len, TILE), generation_start_tile(kv_len, GEN, TILE)
    scores = torch.rand(n_heads, nb, nb, generator=gen)
    keep = torch.zeros(n_heads, nb, nb, dtype=torch.bool)
    prompt = scores[..., :g].topk(min(num_kept_tiles(nb, select), g), dim=-1).indices
    keep[..., :g].scatter_(-1, prompt, True)
    gen_tiles = scores[..., g:].topk(num_kept_tiles(nb - g, select), dim=-1).indices + g
    keep.scatter_(-1, gen_tiles, True)
    return TilePattern.from_dense_mask(keep.to(DEVICE), TILE, kv_len)


def bench_case(model, kv_len, select, rep_ms):
    n_heads, n_kv, head_dim = MODELS[model]
    q, kc, vc, cu, lens, table = make_batch(ROWS, kv_len, 1, n_heads, n_kv, head_dim, 128)
    scale = head_dim**-0.5
    pattern = selected_pattern(n_heads, kv_len, select, seed=kv_len)
    start = kv_len - GEN + 96  # the fourth block of the canvas
    args = (q, kc, vc, cu, lens, table, scale)
    # The engine builds the window plan once per step and the kept-tile lists once per block.
    pack = sparse_mod.head_pack(n_heads, n_kv)
    block_q = sparse_mod.default_block_m(ROWS, pack) // pack
    plan = windows.plan_windows([ROWS], [start], TILE, block_q, DEVICE)
    lists = windows.window_lists(pattern, *plan.tiles[0], n_kv)
    sparse = lambda: cached_sparse_attention(  # noqa: E731
        *args, [pattern], [start], [ROWS], plan=plan, lists=lists
    )
    dense = lambda: cached_attention(*args, max_seqlen_q=ROWS, max_kv_len=kv_len)  # noqa: E731
    want = cached_attention_ref(*args, [pattern], [start])
    out = sparse()
    err = float((out.double() - want.double()).norm() / want.double().norm())
    window_tiles = pattern.kv_counts[:, start // TILE]
    kept = float(window_tiles.float().mean()) / pattern.num_tiles
    read_tiles = float(lists.kv_counts[:, start // TILE - plan.tiles[0][0]].sum())
    sparse_ms, dense_ms = _try(lambda: bench_ms(sparse, rep_ms)), bench_ms(dense, rep_ms)
    # K and V of the tiles read: per KV head, the union of its query heads' kept tiles.
    kept_bytes = 2 * read_tiles * TILE * head_dim * q.element_size()
    row = {
        "model": model,
        "kv_len": kv_len,
        "select": select,
        "kept_fraction": kept,
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "rel_rms": err,
    }
    if isinstance(sparse_ms, float):
        row["speedup"] = dense_ms / sparse_ms
        row["kept_GBps"] = kept_bytes / sparse_ms / 1e6
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llada,dream")
    ap.add_argument("--lengths", default="16384,32768,65536")
    ap.add_argument("--selects", default="0.1,0.3,0.5")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--out", default="cached_sparse_results.json")
    args = ap.parse_args()
    cases = [
        (m, int(n), float(s))
        for m in args.models.split(",")
        for n in args.lengths.split(",")
        for s in args.selects.split(",")
    ]
    rows = [bench_case(*c, args.rep_ms) for c in tqdm(cases, desc="cached-sparse")]
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(
        "| model | keys | select | kept | dense ms | sparse ms | speed-up | kept GB/s | rel RMS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['kv_len']} | {r['select']} | {r['kept_fraction']:.2f} | "
            f"{r['dense_ms']:.3f} | {_f(r['sparse_ms'])} | {_f(r.get('speedup'))} | "
            f"{_f(r.get('kept_GBps'))} | {r['rel_rms']:.1e} |"
        )


def _f(x):
    return f"{x:.3f}" if isinstance(x, float) else str(x)


if __name__ == "__main__":
    main()
