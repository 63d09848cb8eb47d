"""OpenAI server: refuse `prompt + max_tokens > max_model_len` instead of shortening the canvas.

Why it exists: vLLM's OpenAI handlers silently lower `max_tokens` to the room left after the
prompt (`get_max_tokens`). For an autoregressive model that only ends generation early; for a
diffusion LM `max_tokens` is the canvas length and fixes the block schedule, so a silently
different canvas answers a different request. The handlers import `get_max_tokens` by name, so
the strict version replaces that name in each handler module of the server process.
Remove when vLLM lets a model opt out of the clamp.
"""

from __future__ import annotations

import functools
import importlib
import sys

# Either is imported by `vllm serve` / the api_server entry point before the engine is built.
_SERVER_MODULES = (
    "vllm.entrypoints.launchers.api_server.entry",
    "vllm.entrypoints.openai.api_server",
)
_HANDLER_MODULES = (
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.scale_out.render.serving",
)


def strict_max_tokens(original):
    @functools.wraps(original)
    def get_max_tokens(max_model_len, max_tokens, input_length, *args, **kwargs):
        if max_tokens is not None and input_length + max_tokens > max_model_len:
            raise ValueError(
                f"prompt ({input_length} tokens) + max_tokens ({max_tokens}) = "
                f"{input_length + max_tokens} exceeds the model length {max_model_len}; a "
                "diffusion LM's canvas is exactly max_tokens long, so lower max_tokens"
            )
        return original(max_model_len, max_tokens, input_length, *args, **kwargs)

    get_max_tokens.sparsed_strict = True
    return get_max_tokens


def install_strict_max_tokens() -> None:
    """Patch the OpenAI handlers of this process (only in the API server; idempotent)."""
    if not any(name in sys.modules for name in _SERVER_MODULES):
        return
    for name in _HANDLER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(module, "get_max_tokens", None)
        if current is not None and not getattr(current, "sparsed_strict", False):
            module.get_max_tokens = strict_max_tokens(current)
