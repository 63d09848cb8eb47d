"""Write LLaDA / Dream checkpoints in the published format, with random weights.

    python -m sparsed_vllm.checkpoint --arch llada --out /tmp/llada-tiny [--preset tiny|small|full]
        [--layers N --hidden N --heads N --kv-heads N --intermediate N --vocab N --max-len N]
        [--seed S] [--dtype float32|bfloat16]

The directory holds config.json (the real fields), safetensors under the real tensor names
(`model.safetensors`, or shards plus `model.safetensors.index.json` past `max_shard_bytes`),
generation_config.json and an offline tokenizer (see `tokenizer_builder`). Weights are a pure
function of (seed, tensor name), so cutting layers keeps the remaining ones identical.

The init makes outputs position-dependent and peaked, so greedy decoding has no near-ties that
fp32 rounding could flip: q/k are scaled up (sharp, RoPE-sensitive attention) and the LM head
gives logits with a standard deviation of `HEAD_LOGIT_STD`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

from sparsed_vllm import configs
from sparsed_vllm.tokenizer_builder import special_token_ids, write_tokenizer

ARCHS = ("llada", "dream")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# Init scales: attention scores q.k / sqrt(d) have std ~ QK_GAIN**2, logits std ~ HEAD_LOGIT_STD.
# A larger head makes argmax gaps wider but saturates softmax confidences to exactly 1.0 in fp32
# (ties between positions); 5 keeps the top-1 log-odds below ~12 on the tiny presets.
EMBED_STD = 1.0
QK_GAIN = 1.6
HEAD_LOGIT_STD = 5.0
NORM_JITTER = 0.1
BIAS_STD = 0.3


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model shape of a preset, after command-line overrides."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_len: int

    def validate(self) -> None:
        """Raise ValueError naming the offending value."""
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive, got {getattr(self, field.name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"head_dim {self.hidden // self.heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, dict[str, Shape]] = {
    "llada": {
        "tiny": Shape(
            layers=2, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=1024, max_len=4096
        ),
        "small": Shape(
            layers=4, hidden=256, heads=8, kv_heads=8, intermediate=768, vocab=4096, max_len=4096
        ),
        "full": Shape(
            layers=32,
            hidden=4096,
            heads=32,
            kv_heads=32,
            intermediate=12288,
            vocab=126464,
            max_len=4096,
        ),
    },
    "dream": {
        "tiny": Shape(
            layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1024, max_len=4096
        ),
        "small": Shape(
            layers=4, hidden=256, heads=8, kv_heads=2, intermediate=768, vocab=4096, max_len=4096
        ),
        "full": Shape(
            layers=28,
            hidden=3584,
            heads=28,
            kv_heads=4,
            intermediate=18944,
            vocab=152064,
            max_len=131072,
        ),
    },
}


def resolve_shape(arch: str, preset: str, **overrides: int | None) -> Shape:
    """Preset shape with non-None overrides applied; ValueError on unknown names or bad shapes."""
    if arch not in PRESETS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if preset not in PRESETS[arch]:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS[arch])}")
    names = {f.name for f in dataclasses.fields(Shape)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown shape override(s) {unknown}; expected some of {sorted(names)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    # LLaDA is multi-head (kv_heads == heads) unless told otherwise; Dream keeps its KV heads.
    if arch == "llada" and "heads" in given:
        given.setdefault("kv_heads", given["heads"])
    shape = dataclasses.replace(PRESETS[arch][preset], **given)
    shape.validate()
    return shape


def llada_config(shape: Shape) -> dict[str, Any]:
    """config.json of a LLaDA checkpoint: the published fields, with `shape` substituted."""
    ids = special_token_ids("llada", shape.vocab)
    fields = dict(configs.LLADA_HERITAGE_DEFAULTS)
    fields.update(
        activation_type="silu",
        architectures=[configs.LLADA_ARCHITECTURE],
        auto_map=configs.LLADA_AUTO_MAP,
        block_type="llama",
        d_model=shape.hidden,
        embedding_size=shape.vocab,
        eos_token_id=ids["eos"],
        include_bias=False,
        include_qkv_bias=False,
        layer_norm_type="rms",
        mask_token_id=ids["mask"],
        max_sequence_length=shape.max_len,
        mlp_hidden_size=shape.intermediate,
        model_type=configs.LLADA_MODEL_TYPE,
        n_heads=shape.heads,
        n_kv_heads=shape.kv_heads,
        n_layers=shape.layers,
        pad_token_id=ids["eos"],
        rms_norm_eps=1e-5,
        rope=True,
        rope_theta=500000.0,
        transformers_version=transformers.__version__,
        use_cache=False,
        vocab_size=shape.vocab,
        weight_tying=False,
    )
    return dict(sorted(fields.items()))


def dream_config(shape: Shape, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a Dream checkpoint: Qwen2 fields + mask_token_id, `shape` substituted."""
    ids = special_token_ids("dream", shape.vocab)
    fields = {
        "architectures": [configs.DREAM_ARCHITECTURE],
        "attention_dropout": 0.0,
        "auto_map": configs.DREAM_AUTO_MAP,
        "bos_token_id": ids["eos"],
        "eos_token_id": ids["eos"],
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "mask_token_id": ids["mask"],
        "max_position_embeddings": shape.max_len,
        "max_window_layers": shape.layers,
        "model_type": configs.DREAM_MODEL_TYPE,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pad_token_id": ids["eos"],
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": shape.vocab,
    }
    return dict(sorted(fields.items()))


def generation_config(arch: str, shape: Shape) -> dict[str, Any]:
    """generation_config.json: token ids, greedy (temperature 0), Dream's diffusion defaults."""
    ids = special_token_ids(arch, shape.vocab)
    fields: dict[str, Any] = {
        "bos_token_id": ids.get("bos", ids["eos"]),
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["eos"],
        "mask_token_id": ids["mask"],
        "temperature": 0.0,
        "transformers_version": transformers.__version__,
    }
    if arch == "dream":
        fields.update(steps=512, alg="origin", alg_temp=None, eps=1e-3)
    return fields


def llada_tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) of every LLaDA tensor, in layer order."""
    d, kv = shape.hidden, shape.kv_heads * shape.head_dim
    specs = [("model.transformer.wte.weight", (shape.vocab, d), "embed")]
    for i in range(shape.layers):
        p = f"model.transformer.blocks.{i}."
        specs += [
            (p + "attn_norm.weight", (d,), "norm"),
            (p + "q_proj.weight", (d, d), "qk"),
            (p + "k_proj.weight", (kv, d), "qk"),
            (p + "v_proj.weight", (kv, d), "linear"),
            (p + "attn_out.weight", (d, d), "linear"),
            (p + "ff_norm.weight", (d,), "norm"),
            (p + "ff_proj.weight", (shape.intermediate, d), "linear"),
            (p + "up_proj.weight", (shape.intermediate, d), "linear"),
            (p + "ff_out.weight", (d, shape.intermediate), "linear"),
        ]
    specs += [
        ("model.transformer.ln_f.weight", (d,), "norm"),
        ("model.transformer.ff_out.weight", (shape.vocab, d), "head"),
    ]
    return specs


def dream_tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) of every Dream (Qwen2-layout) tensor, in layer order."""
    d, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    specs = [("model.embed_tokens.weight", (shape.vocab, d), "embed")]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (d,), "norm"),
            (p + "self_attn.q_proj.weight", (q, d), "qk"),
            (p + "self_attn.q_proj.bias", (q,), "bias"),
            (p + "self_attn.k_proj.weight", (kv, d), "qk"),
            (p + "self_attn.k_proj.bias", (kv,), "bias"),
            (p + "self_attn.v_proj.weight", (kv, d), "linear"),
            (p + "self_attn.v_proj.bias", (kv,), "bias"),
            (p + "self_attn.o_proj.weight", (d, q), "linear"),
            (p + "post_attention_layernorm.weight", (d,), "norm"),
            (p + "mlp.gate_proj.weight", (shape.intermediate, d), "linear"),
            (p + "mlp.up_proj.weight", (shape.intermediate, d), "linear"),
            (p + "mlp.down_proj.weight", (d, shape.intermediate), "linear"),
        ]
    specs += [
        ("model.norm.weight", (d,), "norm"),
        ("lm_head.weight", (shape.vocab, d), "head"),
    ]
    return specs


TENSOR_SPECS = {"llada": llada_tensor_specs, "dream": dream_tensor_specs}


def _tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by (seed, tensor name): tensors do not depend on each other."""
    # CPU generators keep only 32 bits of a seed, so hash both parts into 32 bits.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def init_tensor(name: str, dims: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    """Random fp32 tensor of one init kind (see module docstring for the scales)."""
    noise = torch.randn(dims, generator=_tensor_generator(seed, name))
    fan_in = dims[-1]
    if kind == "norm":
        return noise.mul_(NORM_JITTER).add_(1.0)
    scale = {
        "embed": EMBED_STD,
        "qk": QK_GAIN / math.sqrt(fan_in),
        "linear": 1.0 / math.sqrt(fan_in),
        "bias": BIAS_STD,
        "head": HEAD_LOGIT_STD / math.sqrt(fan_in),
    }[kind]
    return noise.mul_(scale)


def _shards(
    specs: list[tuple[str, tuple[int, ...], str]], itemsize: int, max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Greedy packing of tensors, in order, into shards of at most max_shard_bytes each."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _shard_tensors(
    shard: list[tuple[str, tuple[int, ...], str]], seed: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Generate one shard's tensors lazily, cast to the checkpoint dtype."""
    for name, dims, kind in shard:
        yield name, init_tensor(name, dims, kind, seed).to(dtype)


def write_weights(
    out: Path, specs: list, seed: int, dtype: torch.dtype, max_shard_bytes: int
) -> list[str]:
    """Write safetensors shard by shard (peak memory: one shard); returns the file names."""
    shards = _shards(specs, torch.finfo(dtype).bits // 8, max_shard_bytes)
    if len(shards) == 1:
        save_file(
            dict(_shard_tensors(shards[0], seed, dtype)),
            out / "model.safetensors",
            metadata={"format": "pt"},
        )
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(names, shards, strict=True):
        tensors = dict(_shard_tensors(shard, seed, dtype))
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_checkpoint(
    out_dir: str | Path,
    arch: str,
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    weights: bool = True,
    **overrides: int | None,
) -> Path:
    """Write a checkpoint dir for `arch` ("llada" | "dream"); returns its path.

    overrides: layers, hidden, heads, kv_heads, intermediate, vocab, max_len.
    dtype: float32 by default, bfloat16 for the `full` preset.
    weights=False writes everything but the weights: for engines started with vLLM's
    `load_format="dummy"` (random weights made on the device; seconds instead of minutes for the
    full shapes, for speed measurements).
    """
    shape = resolve_shape(arch, preset, **overrides)
    dtype = _resolve_dtype(dtype, preset)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    config = llada_config(shape) if arch == "llada" else dream_config(shape, dtype)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(arch, shape))
    write_tokenizer(out, arch, shape.vocab, shape.max_len)
    if weights:
        write_weights(out, TENSOR_SPECS[arch](shape), seed, dtype, max_shard_bytes)
    return out


def _resolve_dtype(dtype: torch.dtype | str | None, preset: str) -> torch.dtype:
    """None -> preset default; strings by name; ValueError for anything else."""
    if dtype is None:
        return torch.bfloat16 if preset == "full" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; expected float32 or bfloat16")
    return dtype


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--preset", choices=("tiny", "small", "full"), default="tiny")
    for flag in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab", "max-len"):
        parser.add_argument(f"--{flag}", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    parser.add_argument(
        "--no-weights",
        action="store_true",
        help="config, generation config and tokenizer only (serve with --load-format dummy)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    out = write_checkpoint(
        args.out,
        args.arch,
        preset=args.preset,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_bytes,
        weights=not args.no_weights,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        max_len=args.max_len,
    )
    print(out)


if __name__ == "__main__":
    main()
