"""Front end: refuse `prompt + max_tokens > max_model_len` instead of shortening the canvas.

Why it exists: a diffusion LM's `max_tokens` is the canvas length and fixes the block schedule,
so a request whose canvas does not fit cannot be served partly. vLLM lets it through in two
places, each patched here in the front-end process only:
- the OpenAI handlers silently lower `max_tokens` to the room left after the prompt
  (`get_max_tokens`; an autoregressive model then just stops early). The handlers import it by
  name, so the strict version replaces that name in each handler module of the server process;
- `LLM.generate` / `LLMEngine.add_request` check only the prompt against `max_model_len`
  (`InputProcessor.process_inputs`); without the wrapper below the request reaches the engine,
  which can only finish it with finish_reason "error". The wrapper raises vLLM's own
  validation error there, for LLaDA/Dream engines only.
Remove when vLLM lets a model opt out of the clamp and validate the full sequence length.
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
            raise ValueError(_canvas_error(input_length, max_tokens, max_model_len))
        return original(max_model_len, max_tokens, input_length, *args, **kwargs)

    get_max_tokens.sparsed_strict = True
    return get_max_tokens


def _canvas_error(prompt_len: int, max_tokens: int, max_model_len: int) -> str:
    return (
        f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
        f"exceeds the model length {max_model_len}; a diffusion LM's canvas is exactly "
        "max_tokens long, so lower max_tokens or shorten the prompt"
    )


def install_canvas_length_check() -> None:
    """Wrap `InputProcessor.process_inputs` (idempotent; other architectures pass through)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from sparsed_vllm.core.params import family_of

    original = InputProcessor.process_inputs
    if getattr(original, "sparsed_canvas_check", False):
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        params = request.sampling_params
        model_config = self.model_config
        if params is None or params.max_tokens is None or request.prompt_token_ids is None:
            return request
        try:
            family_of(model_config.architecture)
        except ValueError:
            return request  # not a diffusion LM: vLLM's own rules
        prompt_len = len(request.prompt_token_ids)
        if prompt_len + params.max_tokens > model_config.max_model_len:
            raise VLLMValidationError(
                _canvas_error(prompt_len, params.max_tokens, model_config.max_model_len),
                parameter="max_tokens",
                value=params.max_tokens,
            )
        return request

    process_inputs.sparsed_canvas_check = True
    InputProcessor.process_inputs = process_inputs


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
