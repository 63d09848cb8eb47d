"""Plain PyTorch LLaDA and Dream: the numerical reference for the vLLM models and kernels.

Module names mirror the published checkpoints, so `state_dict()` keys ARE the real tensor names
and loading is a strict `load_state_dict`. Attention is bidirectional (no mask). The attention
function is swappable: any `(q, k, v) -> out` with q/k/v/out in [B, H, L, D] (k and v are already
expanded to the query heads for GQA), given per call or per layer.

Cached decoding (CACHED.md) needs two more forwards: `forward_with_kv` (a full forward that also
returns every layer's keys and values) and `forward_window` (a slice of the sequence run against
such a cache, its fresh keys and values replacing the slice's).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from sparsed_vllm.configs import DreamConfig, LLaDAConfig

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
AttnArg = AttnFn | Sequence[AttnFn] | None


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense bidirectional attention. q, k, v: [B, H, L, D] -> [B, H, L, D]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as both published models do."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnt scale. x: [..., D]."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, ...]:
    """NeoX RoPE tables in fp32. positions: [B, L] -> cos, sin: [B, 1, L, head_dim]."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponent)  # [head_dim / 2]
    freqs = positions.float()[..., None] * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, head_dim]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (NeoX layout, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, H, L, D] in fp32 (LLaDA's rope_full_precision) and cast back."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def _layer_attn_fn(attn_fn: AttnArg, default: AttnFn, layer: int) -> AttnFn:
    """Pick layer `layer`'s attention function from None, one callable, or one per layer."""
    if attn_fn is None:
        return default
    if callable(attn_fn):
        return attn_fn
    return attn_fn[layer]


def _positions(input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Default positions 0..L-1. input_ids: [B, L] -> [B, L]."""
    if positions is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return positions.expand(input_ids.shape[0], -1) if positions.dim() == 1 else positions


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: tuple, attn_fn: AttnFn
) -> torch.Tensor:
    """RoPE + GQA expansion + attention. q: [B, L, H, D], k/v: [B, L, Hkv, D] -> [B, L, H*D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D]
    q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
    # Query head h reads KV head h // (H / Hkv), as in both published models.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = attn_fn(q, k, v)  # [B, H, L, D]
    return out.transpose(1, 2).flatten(2)


def _kv_heads(t: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Undo the GQA expansion: [B, H, L, D] with H = groups * Hkv -> [B, Hkv, L, D]."""
    return t[:, :: t.shape[1] // num_kv_heads].contiguous()


def _recording_attention(attn_fn: AttnFn, num_kv_heads: int, slot: list, layer: int) -> AttnFn:
    """`attn_fn` that also stores its post-RoPE (k, v), before GQA expansion, in slot[layer]."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        slot[layer] = (_kv_heads(k, num_kv_heads), _kv_heads(v, num_kv_heads))
        return attn_fn(q, k, v)

    return attend


def _window_attention(
    cache_k: torch.Tensor, cache_v: torch.Tensor, start: int, mask: torch.Tensor | None = None
) -> AttnFn:
    """Attention of a window at [start, start + n) over a copy of one layer's cache in which the
    window's fresh keys and values replace that slice. cache_k/v: [B, Hkv, L, D]; mask: None,
    or bool [H, n, L], True where a window row may attend to a key."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups, end = q.shape[1] // cache_k.shape[1], start + q.shape[2]
        keys, values = cache_k.clone(), cache_v.clone()
        keys[:, :, start:end] = k[:, ::groups]
        values[:, :, start:end] = v[:, ::groups]
        keys, values = (t.repeat_interleave(groups, dim=1) for t in (keys, values))
        if mask is None:
            return sdpa_attention(q, keys, values)  # [B, H, n, D]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    return attend


def _check_window(window_ids: torch.Tensor, start: int, kv: Sequence, num_layers: int) -> None:
    """Refuse a window that does not fit the cache it is spliced into."""
    if len(kv) != num_layers:
        raise ValueError(f"kv has {len(kv)} layers, the model has {num_layers}")
    batch, seq_len = kv[0][0].shape[0], kv[0][0].shape[2]
    if window_ids.dim() != 2 or window_ids.shape[0] != batch:
        raise ValueError(f"window_ids must be [{batch}, n], got shape {tuple(window_ids.shape)}")
    end = start + window_ids.shape[1]
    if start < 0 or end > seq_len:
        raise ValueError(f"window [{start}, {end}) does not fit the cached length {seq_len}")


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return [path / "model.safetensors"]
    return [
        path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
    ]


def _load_into(model: nn.Module, path: Path, dtype: torch.dtype, device: str) -> None:
    """Strict load by the real tensor names, casting tensor by tensor to keep peak memory low."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names = f.keys()
            for name in names:
                tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)


class LLaDABlock(nn.Module):
    """LLaDA `block_type: llama` block: pre-norm attention and SwiGLU, both residual."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=cfg.include_bias)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=cfg.include_bias)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=cfg.include_bias)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=cfg.include_bias)

    def forward(self, x: torch.Tensor, cos_sin: tuple, attn_fn: AttnFn) -> torch.Tensor:
        """x: [B, L, d_model] -> [B, L, d_model]."""
        b, n = x.shape[:2]
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, n, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(b, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(b, n, self.n_kv_heads, self.head_dim)
        x = x + self.attn_out(_attention(q, k, v, cos_sin, attn_fn))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


def _check_llada_supported(cfg: LLaDAConfig) -> None:
    """Refuse config options that change the math and are not implemented here."""
    unsupported = {
        "block_type": (cfg.block_type, "llama"),
        "activation_type": (cfg.activation_type, "silu"),
        "layer_norm_type": (cfg.layer_norm_type, "rms"),
        "rope": (cfg.rope, True),
        "alibi": (getattr(cfg, "alibi", False), False),
        "scale_logits": (getattr(cfg, "scale_logits", False), False),
        "input_emb_norm": (getattr(cfg, "input_emb_norm", False), False),
    }
    for name, (value, expected) in unsupported.items():
        if value != expected:
            raise ValueError(f"LLaDA reference supports {name}={expected!r} only, got {value!r}")


class _ReferenceLM(nn.Module):
    """What LLaDA and Dream share: loading by the real names, the layer loop, raw logits.

    Subclasses set `config_class` and provide `_parts()` (embedding, layers, final norm) and
    `compute_logits`.
    """

    config_class: type

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
        """Build from a checkpoint dir (config.json + safetensors by the real names)."""
        path = Path(path)
        cfg = cls.config_class.from_json_file(str(path / "config.json"))
        with torch.device("meta"):
            model = cls(cfg)
        _load_into(model, path, dtype, device)
        return model.eval()

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_fn: AttnArg = None,
    ) -> torch.Tensor:
        """input_ids: [B, L] -> final-norm hidden states [B, L, hidden]."""
        embed, layers, norm = self._parts()
        cos_sin = rope_cos_sin(
            _positions(input_ids, positions), self.config.head_dim, self.config.rope_theta
        )
        x = embed(input_ids)
        for i, layer in enumerate(layers):
            x = layer(x, cos_sin, _layer_attn_fn(attn_fn, self.attn_fn, i))
        return norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_fn: AttnArg = None,
    ) -> torch.Tensor:
        """input_ids: [B, L] -> raw logits [B, L, V] (no shift)."""
        return self.compute_logits(self.forward_hidden(input_ids, positions, attn_fn))

    def forward_with_kv(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_fn: AttnArg = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Full forward that also returns every layer's keys and values.

        input_ids: [B, L] -> (hidden [B, L, hidden], kv), kv[layer] = (k, v), each
        [B, Hkv, L, D]: keys after RoPE, both before the GQA expansion.
        """
        layers = self._parts()[1]
        kv: list = [None] * len(layers)
        attn_fns = [
            _recording_attention(
                _layer_attn_fn(attn_fn, self.attn_fn, i), self.config.num_key_value_heads, kv, i
            )
            for i in range(len(layers))
        ]
        return self.forward_hidden(input_ids, positions, attn_fns), kv

    def forward_window(
        self,
        window_ids: torch.Tensor,
        start: int,
        kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
        masks: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Forward of the positions [start, start + n) against a K/V cache of the whole sequence.

        window_ids: [B, n]; kv as returned by `forward_with_kv` for length L. In every layer the
        window's fresh keys and values replace positions [start, start + n) of a copy of that
        layer's cache (`kv` itself is not modified) and the window's queries attend, unmasked,
        to all L positions. RoPE uses the absolute positions. `masks` (one per layer, bool
        [H, n, L] or None) restricts which keys each window row attends to (block-sparse
        attention). -> hidden [B, n, hidden].
        """
        _check_window(window_ids, start, kv, len(self._parts()[1]))
        positions = torch.arange(start, start + window_ids.shape[1], device=window_ids.device)
        masks = masks or [None] * len(kv)
        attn_fns = [_window_attention(k, v, start, m) for (k, v), m in zip(kv, masks, strict=True)]
        return self.forward_hidden(window_ids, positions, attn_fns)


class LLaDAModel(_ReferenceLM):
    """LLaDA-8B / LLaDA-1.5 masked-diffusion LM. Tensor names: `model.transformer.*`."""

    config_class = LLaDAConfig

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        _check_llada_supported(cfg)
        self.config = cfg
        self.attn_fn: AttnFn = sdpa_attention
        transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.embedding_size, cfg.d_model),
                "blocks": nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
                "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            }
        )
        if not cfg.weight_tying:
            transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        self.model = nn.Module()
        self.model.transformer = transformer

    def _parts(self):
        tr = self.model.transformer
        return tr["wte"], tr["blocks"], tr["ln_f"]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., d_model] (any subset of rows) -> logits [..., embedding_size]."""
        tr = self.model.transformer
        if self.config.weight_tying:
            return F.linear(hidden, tr["wte"].weight)
        return tr["ff_out"](hidden)


class DreamAttention(nn.Module):
    """Qwen2 attention: q/k/v with bias, o_proj without, GQA."""

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple, attn_fn: AttnFn) -> torch.Tensor:
        """x: [B, L, hidden] -> [B, L, hidden]."""
        b, n = x.shape[:2]
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim)
        return self.o_proj(_attention(q, k, v, cos_sin, attn_fn))


class DreamMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamLayer(nn.Module):
    """Qwen2 decoder layer with bidirectional attention."""

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DreamMLP(cfg)

    def forward(self, x: torch.Tensor, cos_sin: tuple, attn_fn: AttnFn) -> torch.Tensor:
        """x: [B, L, hidden] -> [B, L, hidden]."""
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, attn_fn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBackbone(nn.Module):
    """`model.*` of the Dream checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(_ReferenceLM):
    """Dream-v0-7B masked-diffusion LM. Logits are unshifted; generation shifts them."""

    config_class = DreamConfig

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.config = cfg
        self.attn_fn: AttnFn = sdpa_attention
        self.model = DreamBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def _parts(self):
        return self.model.embed_tokens, self.model.layers, self.model.norm

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., hidden] (any subset of rows) -> logits [..., vocab_size]."""
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)


def load_reference_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LLaDAModel | DreamModel:
    """Pick LLaDAModel or DreamModel from config.json's `model_type`."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    classes = {"llada": LLaDAModel, "Dream": DreamModel}
    if model_type not in classes:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(classes)}")
    return classes[model_type].from_pretrained(path, dtype=dtype, device=device)
