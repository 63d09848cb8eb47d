"""Step-level benchmark: one LLaDA-8B-shaped layer (projections, RoPE, attention, SwiGLU MLP), and
the end-to-end projection over a request with `T` denoising steps and `skip`.

A plain PyTorch layer (random bf16 weights, d_model 4096, 32 heads x 128, MLP 12288) runs with:
- `published`: SDPA FlashAttention-2, as the published SparseD code's dense path;
- `dense`: our `dense_attention` (fastest backend on the card);
- `select`: dense attention with LSE + `fused_select_pattern` reusing it (the switch step);
- `sparse`: `sparse_attention` over a pattern with `select` of the tiles; `sparse_fa4` the same
  pattern through FlashAttention-4 where it runs (the engine's default there), with its own
  projection (`projection_fa4`, `projection_fused_fa4`).
Logits: the published path projects all L positions onto the 126,464-token vocabulary every step;
ours only the current block's `block_length` positions (only those can be committed).
Elementwise work (RMSNorm + residual add, RoPE on q/k, SiLU-and-mul) runs as plain PyTorch ops
(as in the published code, and in a vLLM engine with its compiled ops off) and, for our paths, also
fused (`*_fused`: each helper compiled by Inductor into one or two Triton kernels, standing in for
vLLM's fused CUDA ops, which the plugin's engines use by default). Peak memory above the layer's
inputs and weights is recorded per step kind (`mem_*`, GiB), and the pattern's size per layer.

    python benchmarks/bench_step.py --lens 16384,32768,65536 --out step_results.json
"""

import argparse
import datetime
import json
import math

import torch
import torch.nn.functional as F
import triton
from sparsed_vllm.kernels import dense_attention, fused_select_pattern, sparse_attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

D_MODEL, HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = 4096, 32, 128, 12288, 126464, 32


def bench_ms(fn, rep_ms: int = 500) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=100, rep=rep_ms, return_mode="median")


def _rms_norm(x, w):
    return F.rms_norm(x, (D_MODEL,), w)


def _residual_rms_norm(x, delta, w):
    """Residual add and the next RMSNorm (vLLM's `fused_add_rms_norm`)."""
    x = x + delta
    return x, F.rms_norm(x, (D_MODEL,), w)


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _split_rope(qkv, cos, sin):
    """Fused QKV output -> RoPE'd q, k and v, `[L, H, D]` each."""
    q, k, v = qkv.view(-1, 3 * HEADS, HEAD_DIM).split(HEADS, dim=1)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _silu_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Layer:
    """LLaDA-8B block: RMSNorm, fused QKV, RoPE, attention, out proj, RMSNorm, SwiGLU MLP."""

    def __init__(self, seq_len, device="cuda", dtype=torch.bfloat16):
        def w(rows, cols):
            return torch.randn(rows, cols, device=device, dtype=dtype) / math.sqrt(cols)

        self.w_qkv, self.w_o = w(3 * D_MODEL, D_MODEL), w(D_MODEL, D_MODEL)
        self.w_gate_up, self.w_down = w(2 * MLP, D_MODEL), w(D_MODEL, MLP)
        self.norm1 = torch.ones(D_MODEL, device=device, dtype=dtype)
        self.norm2 = torch.ones(D_MODEL, device=device, dtype=dtype)
        inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device) / HEAD_DIM)
        angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
        self.cos = torch.cat([angles.cos()] * 2, -1)[:, None].to(dtype)  # [L, 1, D]
        self.sin = torch.cat([angles.sin()] * 2, -1)[:, None].to(dtype)
        self.ops = {
            False: (_rms_norm, _split_rope, _residual_rms_norm, _silu_mul),
            True: tuple(
                torch.compile(f, dynamic=False)
                for f in (_rms_norm, _split_rope, _residual_rms_norm, _silu_mul)
            ),
        }

    def qkv(self, x, fused=False):
        norm, split_rope, _, _ = self.ops[fused]
        return split_rope(norm(x, self.norm1) @ self.w_qkv.T, self.cos, self.sin)

    def forward(self, x, attend, fused=False):
        _, _, residual_norm, silu_mul = self.ops[fused]
        q, k, v = self.qkv(x, fused)
        attn = attend(q, k, v)
        x, h = residual_norm(x, attn.reshape(-1, D_MODEL) @ self.w_o.T, self.norm2)
        return x + silu_mul(h @ self.w_gate_up.T) @ self.w_down.T


def peak_gib(fn) -> float:
    """Peak memory allocated during `fn()` above what was allocated before it, GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def sdpa_fa2(q, k, v, scale):
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q4, k4, v4, scale=scale)[0].transpose(0, 1)


def step_times(seq_len, select, gen_length, sparse_cfg=None, mass_cfg=None):
    layer = Layer(seq_len)
    x = torch.randn(seq_len, D_MODEL, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, seq_len], dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(HEAD_DIM)
    q, k, _ = layer.qkv(x)
    pattern = fused_select_pattern(q, k, cu, [gen_length], 128, select, scale, config=mass_cfg)

    def select_attend(q, k, v):
        out, lse = dense_attention(q, k, v, cu, seq_len, scale, return_lse=True)
        fused_select_pattern(q, k, cu, [gen_length], 128, select, scale, lse, mass_cfg)
        return out

    attends = {
        "published": lambda q, k, v: sdpa_fa2(q, k, v, scale),
        "dense": lambda q, k, v: dense_attention(q, k, v, cu, seq_len, scale),
        "select": select_attend,
        "sparse": lambda q, k, v: sparse_attention(q, k, v, cu, pattern, scale, config=sparse_cfg),
        "no_attention": lambda q, k, v: q,
    }
    from sparsed_vllm.kernels.block_sparse import fa4

    if fa4.fa4_runs(128, HEAD_DIM, q.device):  # the engine's default on Hopper when it imports
        fa4_pattern = fa4.prepare_fa4_pattern(pattern)
        attends["sparse_fa4"] = lambda q, k, v: fa4.fa4_sparse_attention(
            q, k, v, cu, fa4_pattern, scale
        )
    res = {}
    for name, attend in attends.items():
        for fused in (False, True) if name != "published" else (False,):
            key = name + ("_fused" if fused else "")
            res[key] = bench_ms(lambda a=attend, f=fused: layer.forward(x, a, f))
            res["mem_" + key] = peak_gib(lambda a=attend, f=fused: layer.forward(x, a, f))
    res["kept_fraction"] = sum(p.kept_fraction() for p in pattern.unpack())
    res["pattern_mib_per_layer"] = (
        pattern.kv_indices.numel() * 4 + pattern.kv_counts.numel() * 4
    ) / 2**20
    res.update(logits_times(x))
    return res


def logits_times(x):
    lm_head = torch.randn(VOCAB, D_MODEL, device="cuda", dtype=torch.bfloat16) / 64
    return {
        "logits_all": bench_ms(lambda: x @ lm_head.T),
        "logits_block32": bench_ms(lambda: x[-32:] @ lm_head.T),
    }


def project(times, steps, skip, fused=False, sparse="sparse"):
    """Seconds per request (LAYERS layers): published dense path vs ours dense vs ours SparseD.

    `fused`: our paths with fused elementwise ops (the published path stays as published);
    `sparse`: the step kind of the sparse steps ("sparse" or "sparse_fa4").
    """
    switch = int(steps * skip) + 1
    n_dense, n_select = min(switch, steps), int(switch < steps)
    n_sparse = steps - n_dense - n_select
    lb = times["logits_block32"]
    sfx = "_fused" if fused else ""
    published = steps * (LAYERS * times["published"] + times["logits_all"])
    dense = steps * (LAYERS * times["dense" + sfx] + lb)
    sparsed = (
        n_dense * (LAYERS * times["dense" + sfx] + lb)
        + n_select * (LAYERS * times["select" + sfx] + lb)
        + n_sparse * (LAYERS * times[sparse + sfx] + lb)
    )
    return {
        "published_dense_s": published / 1e3,
        "ours_dense_s": dense / 1e3,
        "ours_sparsed_s": sparsed / 1e3,
        "speedup_vs_published": published / sparsed,
        "speedup_vs_ours_dense": dense / sparsed,
    }


def best_configs(path, select):
    """Best sparse-kernel and tile-mass configs at the longest length of a bench_attention run."""
    if not path:
        return None, None
    with open(path) as f:
        longest = max(json.load(f)["lens"].items(), key=lambda kv: int(kv[0]))[1]
    sparse = longest["sparse"].get(str(select), {})
    selection = longest["selection"]
    return (
        sparse.get("ours_best_config") if isinstance(sparse, dict) else None,
        selection.get("best_mass_config") if isinstance(selection, dict) else None,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="16384,32768,65536")
    ap.add_argument("--select", type=float, default=0.3)
    ap.add_argument("--gen-length", type=int, default=512)
    ap.add_argument("--skip", type=float, default=0.2)
    ap.add_argument("--out", default="step_results.json")
    ap.add_argument("--attention-json", help="take the best launch configs of bench_attention")
    args = ap.parse_args()
    sparse_cfg, mass_cfg = best_configs(args.attention_json, args.select)
    torch.manual_seed(0)
    results = {
        "configs": {"sparse": sparse_cfg, "mass": mass_cfg},
        "device": torch.cuda.get_device_name(),
        "args": vars(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lens": {},
    }
    for seq_len in tqdm(list(map(int, args.lens.split(","))), desc="lengths", unit="L"):
        times = step_times(seq_len, args.select, args.gen_length, sparse_cfg, mass_cfg)
        proj = {steps: project(times, steps, args.skip) for steps in (128, 1024)}
        proj_fused = {steps: project(times, steps, args.skip, True) for steps in (128, 1024)}
        results["lens"][seq_len] = {
            "ms_per_layer": times,
            "projection": proj,
            "projection_fused": proj_fused,
        }
        if "sparse_fa4" in times:
            for name, fused in (("projection_fa4", False), ("projection_fused_fa4", True)):
                results["lens"][seq_len][name] = {
                    steps: project(times, steps, args.skip, fused, "sparse_fa4")
                    for steps in (128, 1024)
                }
        tqdm.write(json.dumps({seq_len: results["lens"][seq_len]}, indent=1))
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("\nms per layer (fused elementwise in brackets); memory GiB; T=128/1024 x vs published")
    print("L | published | dense | select | sparse | no-attn | logits all | mem dense/sel/sparse")
    for seq_len, row in results["lens"].items():
        t = row["ms_per_layer"]
        cells = [f"{t[n]:.1f} ({t[n + '_fused']:.1f})" for n in ("dense", "select", "sparse")]
        print(
            f"{seq_len} | {t['published']:.1f} | {' | '.join(cells)} | {t['no_attention']:.1f} "
            f"({t['no_attention_fused']:.1f}) | {t['logits_all']:.1f} | {t['mem_dense']:.2f}/"
            f"{t['mem_select']:.2f}/{t['mem_sparse']:.2f} (pattern {t['pattern_mib_per_layer']:.1f}"
            " MiB)"
        )
        if "sparse_fa4" in t:
            print(f"  sparse with FA4: {t['sparse_fa4']:.1f} ({t['sparse_fa4_fused']:.1f})")
        for name in ("projection", "projection_fused", "projection_fa4", "projection_fused_fa4"):
            if name not in row:
                continue
            p = row[name]
            print(
                f"  {name}: T=128 {p[128]['speedup_vs_published']:.2f}x "
                f"({p[128]['speedup_vs_ours_dense']:.2f}x own dense), T=1024 "
                f"{p[1024]['speedup_vs_published']:.2f}x ({p[1024]['speedup_vs_ours_dense']:.2f}x)"
            )


if __name__ == "__main__":
    main()
