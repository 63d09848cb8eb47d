"""Offline stand-in tokenizers for LLaDA and Dream checkpoints written by `checkpoint.py`.

A byte-level BPE (so any text encodes) trained with the `tokenizers` library on a corpus generated
here from a fixed seed, plus each model's special tokens and chat template. Special tokens sit at
their published ids when the vocab is full size, else at the top of the small vocab. Ids that
neither the BPE nor a special token uses are filled with unreachable placeholder tokens, so the
tokenizer's vocab is exactly the model's vocab size.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Published special tokens, in id order: (role, content, id in the full vocab).
LLADA_SPECIALS = (
    ("bos", "<|startoftext|>", 126080),
    ("eos", "<|endoftext|>", 126081),
    ("mask", "<|mdm_mask|>", 126336),
    ("start_header", "<|start_header_id|>", 126346),
    ("end_header", "<|end_header_id|>", 126347),
    ("eot", "<|eot_id|>", 126348),
)
DREAM_SPECIALS = (
    ("eos", "<|endoftext|>", 151643),
    ("im_start", "<|im_start|>", 151644),
    ("im_end", "<|im_end|>", 151645),
    ("mask", "<|mask|>", 151666),
)
SPECIALS = {"llada": LLADA_SPECIALS, "dream": DREAM_SPECIALS}

# Llama-3 layout as LLaDA-8B-Instruct ships it: BOS once, a header per turn, <|eot_id|> ends a turn.
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
DREAM_DEFAULT_SYSTEM = "You are a helpful assistant."
# ChatML as Dream-v0-Instruct ships it, with its default system prompt when none is given.
DREAM_CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DREAM_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"llada": LLADA_CHAT_TEMPLATE, "dream": DREAM_CHAT_TEMPLATE}

# Past this many learned tokens the small corpus has nothing left to merge; the rest is filler.
MAX_LEARNED_TOKENS = 4096
CORPUS_SEED = 20240901
FILLER = "<|unused_{}|>"

# Word lists for the templated sentences.
_SUBJECTS = [
    "the model",
    "a student",
    "my neighbour",
    "the teacher",
    "our team",
    "the farmer",
    "Alice",
    "Bob",
    "the old robot",
    "every engineer",
    "a small cat",
    "the server",
    "this function",
    "the scheduler",
    "the city council",
    "a young scientist",
    "the train",
    "she",
    "he",
    "they",
]
_VERBS = [
    "reads",
    "writes",
    "computes",
    "finds",
    "bakes",
    "sells",
    "buys",
    "builds",
    "explains",
    "answers",
    "counts",
    "measures",
    "paints",
    "repairs",
    "plants",
    "sorts",
    "returns",
    "sends",
    "predicts",
    "generates",
    "visits",
    "describes",
    "checks",
    "solves",
]
_OBJECTS = [
    "three apples",
    "a long letter",
    "the answer",
    "twelve cookies",
    "a new bridge",
    "the result",
    "every token",
    "a short story",
    "the garden",
    "a list of numbers",
    "the final report",
    "an old map",
    "the blue car",
    "seven boxes",
    "the attention mask",
    "a simple question",
    "the whole sequence",
    "two baskets of eggs",
    "a cup of tea",
    "the next block",
]
_TAILS = [
    "before noon.",
    "every morning.",
    "in the library.",
    "with great care.",
    "for the market.",
    "after the meeting.",
    "on Monday.",
    "at the end of the day.",
    "without any help.",
    "because it was raining.",
    "while the others waited.",
    "in less than an hour.",
]
_PARAGRAPHS = (
    "Diffusion language models start from a fully masked canvas and reveal tokens step by step.",
    "At every step the model reads the whole sequence, prompt and canvas, in both directions.",
    "Question: If Tom has 5 apples and buys 7 more, how many apples does he have? Answer: 12.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "Hello, world! How are you today? I'm fine, thanks; and you?",
    "Prices: $3.50, $12.99 and 100% of 2,048 items (about 1e-3 of the total).",
    "Email: someone@example.com; URL: https://example.org/path?x=1&y=2",
    "You are a helpful assistant. Please answer the question step by step.",
    "The capital of France is Paris. The capital of Japan is Tokyo. Water boils at 100 degrees.",
)


def corpus(n_sentences: int = 6000) -> list[str]:
    """Deterministic English-like training text: templated sentences plus fixed paragraphs."""
    rng = random.Random(CORPUS_SEED)
    lines = list(_PARAGRAPHS) * 20
    for _ in range(n_sentences):
        sentence = " ".join(
            (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS))
        )
        lines.append(sentence[0].upper() + sentence[1:])
        lines.append(f"{rng.randint(0, 9999)} + {rng.randint(0, 999)} = ?")
    return lines


def special_token_ids(arch: str, vocab_size: int) -> dict[str, int]:
    """Role -> id: the published ids when they fit in the vocab, else the top ids in order."""
    specials = SPECIALS[arch]
    if vocab_size > max(tid for _, _, tid in specials):
        return {role: tid for role, _, tid in specials}
    if vocab_size < 256 + 2 * len(specials):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    first = vocab_size - len(specials)
    return {role: first + i for i, (role, _, _) in enumerate(specials)}


def special_token_contents(arch: str) -> dict[str, str]:
    """Role -> token string, e.g. {'mask': '<|mdm_mask|>', ...}."""
    return {role: content for role, content, _ in SPECIALS[arch]}


@functools.lru_cache(maxsize=8)
def _trained_bpe_json(n_learned: int) -> str:
    """Train a byte-level BPE with `n_learned` tokens (bytes included); tokenizer.json text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str()


def _added_token(content: str) -> dict[str, Any]:
    """A special token's flags, as tokenizer files spell them (tokenizer.json adds "id")."""
    return {
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def build_tokenizer(arch: str, vocab_size: int) -> Tokenizer:
    """The full tokenizer for `arch`: learned BPE, fillers, specials at `special_token_ids`."""
    ids = special_token_ids(arch, vocab_size)
    contents = special_token_contents(arch)
    n_learned = min(vocab_size - len(ids), MAX_LEARNED_TOKENS, min(ids.values()))
    spec = json.loads(_trained_bpe_json(n_learned))
    # Learned ids are 0..n_learned-1, all below the first special id.
    learned = {tid: token for token, tid in spec["model"]["vocab"].items()}
    by_id = {tid: contents[role] for role, tid in ids.items()}
    tokens = (by_id.get(tid) or learned.get(tid) or FILLER.format(tid) for tid in range(vocab_size))
    spec["model"]["vocab"] = {token: tid for tid, token in enumerate(tokens)}
    spec["added_tokens"] = [{"id": tid, **_added_token(by_id[tid])} for tid in sorted(by_id)]
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_config(arch: str, vocab_size: int, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json contents (special tokens, chat template, no auto BOS)."""
    ids = special_token_ids(arch, vocab_size)
    contents = special_token_contents(arch)
    bos = contents["bos"] if arch == "llada" else contents["eos"]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": contents["eos"],
        "pad_token": contents["eos"],
        "mask_token": contents["mask"],
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATES[arch],
        "added_tokens_decoder": {
            str(tid): _added_token(contents[role])
            for role, tid in sorted(ids.items(), key=lambda item: item[1])
        },
    }


def write_tokenizer(out_dir: str | Path, arch: str, vocab_size: int, max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out = Path(out_dir)
    build_tokenizer(arch, vocab_size).save(str(out / "tokenizer.json"))
    config = tokenizer_config(arch, vocab_size, max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {
        key: config[key] for key in ("bos_token", "eos_token", "pad_token", "mask_token")
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
