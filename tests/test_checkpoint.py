"""Checkpoint writer: real file format, tokenizer, special ids, determinism, vLLM config."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from sparsed_vllm.checkpoint import PRESETS, main, resolve_shape, write_checkpoint
from sparsed_vllm.configs import DreamConfig, LLaDAConfig
from sparsed_vllm.reference.models import DreamModel, LLaDAModel
from sparsed_vllm.tokenizer_builder import write_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

LLADA_LAYER_TENSORS = (
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attn_out",
    "ff_norm",
    "ff_proj",
    "up_proj",
    "ff_out",
)
DREAM_LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def _tensor_shapes(ckpt_dir) -> dict[str, tuple[int, ...]]:
    with safe_open(str(ckpt_dir / "model.safetensors"), framework="pt") as f:
        names = f.keys()
        return {name: tuple(f.get_slice(name).get_shape()) for name in names}


def _json(path) -> dict:
    return json.loads(path.read_text())


def test_llada_tensor_names_are_the_published_ones(llada_tiny_dir):
    expected = {
        "model.transformer.wte.weight",
        "model.transformer.ln_f.weight",
        "model.transformer.ff_out.weight",
    }
    for layer in range(2):
        expected |= {f"model.transformer.blocks.{layer}.{t}.weight" for t in LLADA_LAYER_TENSORS}
    shapes = _tensor_shapes(llada_tiny_dir)
    assert set(shapes) == expected
    assert shapes["model.transformer.wte.weight"] == (1024, 64)
    assert shapes["model.transformer.ff_out.weight"] == (1024, 64)
    assert shapes["model.transformer.blocks.1.ff_proj.weight"] == (128, 64)
    assert shapes["model.transformer.blocks.1.ff_out.weight"] == (64, 128)


def test_dream_tensor_names_are_the_published_ones(dream_tiny_dir):
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(2):
        expected |= {f"model.layers.{layer}.{t}" for t in DREAM_LAYER_TENSORS}
    shapes = _tensor_shapes(dream_tiny_dir)
    assert set(shapes) == expected
    # GQA: 4 query heads, 2 KV heads of 16.
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["model.layers.0.self_attn.v_proj.bias"] == (32,)
    assert shapes["lm_head.weight"] == (1024, 64)


def test_llada_config_json_has_published_fields(llada_tiny_dir):
    cfg = _json(llada_tiny_dir / "config.json")
    assert cfg["architectures"] == ["LLaDAModelLM"]
    assert cfg["model_type"] == "llada"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_llada.LLaDAConfig"
    for field in (
        "alibi",
        "init_fn",
        "precision",
        "scale_logits",
        "flash_attention",
        "rope",
        "block_type",
        "activation_type",
        "mlp_ratio",
        "embedding_size",
    ):
        assert field in cfg, field
    assert (cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["mlp_hidden_size"]) == (
        64,
        2,
        4,
        128,
    )
    assert cfg["rope_theta"] == 500000.0 and cfg["weight_tying"] is False


def test_configs_load_the_published_8b_and_7b_values():
    llada, dream = LLaDAConfig(), DreamConfig()
    assert (
        llada.hidden_size,
        llada.num_hidden_layers,
        llada.num_attention_heads,
        llada.num_key_value_heads,
        llada.intermediate_size,
        llada.head_dim,
        llada.max_position_embeddings,
        llada.vocab_size,
    ) == (4096, 32, 32, 32, 12288, 128, 4096, 126464)
    assert (
        dream.hidden_size,
        dream.num_hidden_layers,
        dream.num_attention_heads,
        dream.num_key_value_heads,
        dream.intermediate_size,
        dream.head_dim,
        dream.vocab_size,
        dream.mask_token_id,
    ) == (3584, 28, 28, 4, 18944, 128, 152064, 151666)
    assert llada.rope_theta == 500000.0 and dream.rope_theta == 1000000.0
    assert llada.tie_word_embeddings is False and dream.tie_word_embeddings is False


def test_llada_config_keeps_unknown_fields_and_fills_olmo_fallbacks():
    cfg = LLaDAConfig.from_dict(
        {
            "d_model": 64,
            "n_heads": 4,
            "n_kv_heads": None,
            "mlp_hidden_size": None,
            "mlp_ratio": 3,
            "some_future_field": [1, 2],
            "use_cache": False,
        }
    )
    assert cfg.num_key_value_heads == 4
    assert cfg.intermediate_size == 192
    assert cfg.some_future_field == [1, 2]
    assert cfg.use_cache is False


def test_config_rejects_rope_scaling():
    with pytest.raises(ValueError, match="linear"):
        DreamConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})


_OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from sparsed_vllm.configs import register_configs
    register_configs()
    out = {}
    for path in sys.argv[1:]:
        cfg, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        gen = GenerationConfig.from_pretrained(path)
        chat = tok.apply_chat_template(
            [{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=False)
        out[path] = {
            "config_class": type(cfg).__name__, "hidden": cfg.hidden_size,
            "cfg_ids": [cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id],
            "cfg_bos": cfg.bos_token_id,
            "tok_ids": [tok.mask_token_id, tok.eos_token_id, tok.pad_token_id],
            "tok_bos": tok.bos_token_id, "gen_ids": [gen.mask_token_id, gen.eos_token_id,
                                                     gen.pad_token_id, gen.bos_token_id],
            "len": len(tok), "chat": chat, "mask_ids": tok.convert_tokens_to_ids(
                [tok.mask_token]), "roundtrip": tok.decode(tok("Hello, wörld! 123")["input_ids"]),
        }
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def offline_load(llada_tiny_dir, dream_tiny_dir):
    """AutoConfig / AutoTokenizer / GenerationConfig loaded in a fresh offline process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, str(llada_tiny_dir), str(dream_tiny_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded[str(llada_tiny_dir)], loaded[str(dream_tiny_dir)]


def test_offline_load_special_ids_agree(offline_load):
    llada, dream = offline_load
    assert llada["config_class"] == "LLaDAConfig" and dream["config_class"] == "DreamConfig"
    # tiny vocab 1024: LLaDA's 6 specials and Dream's 4 sit at the top, in published order.
    assert llada["cfg_ids"] == llada["tok_ids"] == [1020, 1019, 1019]
    assert llada["tok_bos"] == 1018 and llada["gen_ids"] == [1020, 1019, 1019, 1018]
    assert dream["cfg_ids"] == dream["tok_ids"] == [1023, 1020, 1020]
    assert dream["cfg_bos"] == dream["tok_bos"] == 1020
    assert dream["gen_ids"] == [1023, 1020, 1020, 1020]
    assert llada["len"] == dream["len"] == 1024
    assert llada["roundtrip"] == dream["roundtrip"] == "Hello, wörld! 123"


def test_offline_chat_templates_render(offline_load):
    llada, dream = offline_load
    assert llada["chat"] == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert dream["chat"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_encodes_specials_as_single_ids(llada_tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llada_tiny_dir)
    ids = tok("The answer is<|mdm_mask|><|mdm_mask|><|eot_id|>")["input_ids"]
    assert ids[-3:] == [1020, 1020, 1023]
    assert tok.convert_ids_to_tokens([1021, 1022]) == ["<|start_header_id|>", "<|end_header_id|>"]
    # No automatic BOS: the chat template adds it.
    assert ids[0] != tok.bos_token_id
    text = "Ünïcödé, emoji 🚀, tabs\tand\nnewlines."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_dream_generation_config_has_diffusion_defaults(dream_tiny_dir, llada_tiny_dir):
    gen = _json(dream_tiny_dir / "generation_config.json")
    assert (gen["steps"], gen["alg"], gen["alg_temp"], gen["eps"]) == (512, "origin", None, 1e-3)
    for cfg in (gen, _json(llada_tiny_dir / "generation_config.json")):
        assert cfg["temperature"] == 0.0
        assert "top_p" not in cfg and "top_k" not in cfg


@pytest.mark.parametrize(
    ("arch", "vocab", "expected"),
    [
        (
            "llada",
            126464,
            {
                "<|startoftext|>": 126080,
                "<|endoftext|>": 126081,
                "<|mdm_mask|>": 126336,
                "<|start_header_id|>": 126346,
                "<|end_header_id|>": 126347,
                "<|eot_id|>": 126348,
            },
        ),
        (
            "dream",
            152064,
            {
                "<|endoftext|>": 151643,
                "<|im_start|>": 151644,
                "<|im_end|>": 151645,
                "<|mask|>": 151666,
            },
        ),
    ],
)
def test_full_vocab_tokenizer_uses_published_ids(tmp_path, arch, vocab, expected):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, arch, vocab, 4096)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == vocab
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert tok(list(expected)[-1])["input_ids"] == [expected[list(expected)[-1]]]


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_checkpoint(tmp_path / "a", "dream", seed=3)
    b = write_checkpoint(tmp_path / "b", "dream", seed=3)
    c = write_checkpoint(tmp_path / "c", "dream", seed=4)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_cutting_layers_keeps_the_remaining_weights(tmp_path):
    two = LLaDAModel.from_pretrained(write_checkpoint(tmp_path / "two", "llada", layers=2))
    one = LLaDAModel.from_pretrained(write_checkpoint(tmp_path / "one", "llada", layers=1))
    sd2 = two.state_dict()
    for name, value in one.state_dict().items():
        assert torch.equal(value, sd2[name]), name


def test_sharded_checkpoint_loads_identically(tmp_path, dream_tiny_dir, dream_tiny):
    sharded = write_checkpoint(tmp_path / "s", "dream", seed=0, max_shard_bytes=200_000)
    index = _json(sharded / "model.safetensors.index.json")
    files = set(index["weight_map"].values())
    assert len(files) > 1 and not (sharded / "model.safetensors").exists()
    assert all((sharded / f).exists() for f in files)
    assert set(index["weight_map"]) == set(_tensor_shapes(dream_tiny_dir))
    model = DreamModel.from_pretrained(sharded)
    for name, value in dream_tiny.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_bfloat16_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "bf", "dream", dtype="bfloat16")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert _json(path / "config.json")["torch_dtype"] == "bfloat16"


def test_presets_and_overrides():
    full = resolve_shape("llada", "full", layers=4)
    assert (full.layers, full.hidden, full.heads, full.intermediate, full.vocab) == (
        4,
        4096,
        32,
        12288,
        126464,
    )
    dream = PRESETS["dream"]["full"]
    assert (dream.hidden, dream.heads, dream.kv_heads, dream.intermediate, dream.max_len) == (
        3584,
        28,
        4,
        18944,
        131072,
    )
    with pytest.raises(ValueError, match="65"):
        resolve_shape("llada", "tiny", hidden=65)
    with pytest.raises(ValueError, match="3"):
        resolve_shape("dream", "tiny", kv_heads=3)
    with pytest.raises(ValueError, match="huge"):
        resolve_shape("dream", "huge")
    with pytest.raises(ValueError, match="depth"):
        resolve_shape("dream", "tiny", depth=3)


_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from vllm import ModelRegistry
    from vllm.config import ModelConfig, ParallelConfig
    from sparsed_vllm.configs import register_configs

    class Placeholder(torch.nn.Module):
        # Stands in for the plugin model classes: only the interface vLLM inspects.
        def __init__(self, *, vllm_config=None, prefix=""):
            super().__init__()
        def embed_input_ids(self, input_ids): ...
        def forward(self, input_ids, positions): ...
        def compute_logits(self, hidden_states): ...
        def load_weights(self, weights): return set()

    register_configs()
    for arch in ("LLaDAModelLM", "DreamModel"):
        ModelRegistry.register_model(arch, Placeholder)
    out, parallel = {}, ParallelConfig()
    for path in sys.argv[1:]:
        mc = ModelConfig(model=path, tokenizer=path, dtype="float32")
        hf = mc.hf_config
        out[path] = {
            "max_model_len": mc.max_model_len, "head_size": mc.get_head_size(),
            "kv_heads": mc.get_total_num_kv_heads(), "layers": mc.get_num_layers(parallel),
            "heads": mc.get_num_attention_heads(parallel), "hidden": mc.get_hidden_size(),
            "vocab": mc.get_vocab_size(), "dtype": str(mc.dtype), "runner": mc.runner_type,
            "rope_theta": hf.rope_theta, "rope_parameters": hf.rope_parameters,
            "is_causal": hf.is_causal, "sampling": mc.get_diff_sampling_param(),
        }
    print(json.dumps(out))
""")


def test_vllm_model_config_reads_both_checkpoints(llada_tiny_dir, dream_tiny_dir):
    pytest.importorskip("vllm")
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR")
    result = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, str(llada_tiny_dir), str(dream_tiny_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    llada, dream = loaded[str(llada_tiny_dir)], loaded[str(dream_tiny_dir)]
    common = {
        "max_model_len": 4096,
        "head_size": 16,
        "layers": 2,
        "heads": 4,
        "hidden": 64,
        "vocab": 1024,
        "dtype": "torch.float32",
        "runner": "generate",
        "is_causal": False,
        "sampling": {"temperature": 0.0},
    }
    assert llada | common == llada and dream | common == dream
    assert (llada["kv_heads"], dream["kv_heads"]) == (4, 2)
    assert llada["rope_theta"] == 500000.0 and dream["rope_theta"] == 1000000.0
    assert llada["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert dream["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000000.0}


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    main(
        [
            "--arch",
            "llada",
            "--out",
            str(tmp_path / "cli"),
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--vocab",
            "512",
            "--max-len",
            "256",
            "--seed",
            "5",
        ]
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    model = LLaDAModel.from_pretrained(tmp_path / "cli")
    cfg = model.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size, cfg.max_sequence_length) == (
        1,
        32,
        2,
        512,
        256,
    )
    assert cfg.mask_token_id == 512 - 4
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def test_no_weights_writes_config_and_tokenizer_only(tmp_path):
    out = write_checkpoint(tmp_path / "c", "llada", preset="full", layers=2, weights=False)
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if "safetensors" in n]
    assert json.loads((out / "config.json").read_text())["n_layers"] == 2
    main(["--arch", "dream", "--out", str(tmp_path / "d"), "--no-weights"])
    assert not list((tmp_path / "d").glob("*.safetensors"))
