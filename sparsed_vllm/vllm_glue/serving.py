"""Front end: every request is admitted (or refused, naming the field) before it reaches the engine.

Why it exists: a diffusion LM's `max_tokens` is its canvas, which fixes the block schedule, and
its decoding parameters travel in `extra_args`, which vLLM does not look into. vLLM's front end
lets three kinds of bad requests through, each patched here in the front-end process only:
- `InputProcessor.process_inputs` (both `LLM.generate` and the OpenAI server call it) checks
  vLLM's own fields; the wrapper then admits the request with `core.admission` against this
  engine's limits (capability table, model length, pattern pool, value ranges) and raises vLLM's
  `VLLMValidationError(parameter=...)`, an HTTP 400 when served. An offline request without
  max_tokens gets the default canvas here instead of the whole model length;
- the OpenAI handlers silently lower `max_tokens` to the room left after the prompt, and a chat
  request without max_tokens gets all of it (`get_max_tokens`). The handlers import it by name,
  so the strict version replaces that name in each handler module of the server process;
- diffusion fields sent at the top level of a request body instead of in `vllm_xargs` are dropped
  by vLLM's request models with a debug log; `to_sampling_params` is wrapped to refuse them.
Remove when vLLM lets a model validate its own request fields and opt out of the clamp.
"""

from __future__ import annotations

import functools
import importlib
import sys

from sparsed_vllm.core.params import DECODING_KEYS, DEFAULT_MAX_TOKENS, DIFFUSION_KEYS, SPARSED_KEYS

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
_REQUEST_MODELS = (
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
)
_XARGS_KEYS = frozenset(DIFFUSION_KEYS + SPARSED_KEYS + DECODING_KEYS)


def strict_max_tokens(original):
    """`get_max_tokens` that refuses a canvas that does not fit instead of shortening it, and
    gives a request without max_tokens the default canvas instead of the whole model length."""

    @functools.wraps(original)
    def get_max_tokens(max_model_len, max_tokens, input_length, default_sampling_params, *a, **kw):
        sent = max_tokens is not None
        if not sent:
            max_tokens = default_sampling_params.get("max_tokens") or DEFAULT_MAX_TOKENS
        if input_length + max_tokens > max_model_len:
            raise ValueError(_canvas_error(input_length, max_tokens, max_model_len, sent))
        return original(max_model_len, max_tokens, input_length, default_sampling_params, *a, **kw)

    get_max_tokens.sparsed_strict = True
    return get_max_tokens


def _canvas_error(prompt_len: int, max_tokens: int, max_model_len: int, sent: bool) -> str:
    canvas = (
        f"max_tokens ({max_tokens})"
        if sent
        else (f"the default canvas of {max_tokens} tokens (the request sent no max_tokens)")
    )
    room = max(max_model_len - prompt_len, 0)
    return (
        f"prompt ({prompt_len} tokens) + {canvas} = {prompt_len + max_tokens} exceeds the model "
        f"length {max_model_len}; a diffusion LM's canvas is exactly max_tokens long, so send "
        f"max_tokens <= {room} or shorten the prompt"
    )


def install_request_checks() -> None:
    """Wrap `InputProcessor.process_inputs` (idempotent; other architectures pass through)."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "sparsed_admission", False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        limits = _engine_limits(self)
        if limits is not None and getattr(params, "max_tokens", 0) is None:
            params = params.clone()
            params.max_tokens = limits.default_max_tokens
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if limits is not None and request.sampling_params is not None:
            _admit(limits, request)
        return request

    process_inputs.sparsed_admission = True
    InputProcessor.process_inputs = process_inputs


def _engine_limits(input_processor):
    """This engine's limits, built once per InputProcessor; None for other architectures."""
    if "_sparsed_limits" not in input_processor.__dict__:
        from sparsed_vllm.core.params import family_of
        from sparsed_vllm.vllm_glue.admission import engine_limits

        try:
            family_of(input_processor.model_config.architecture)
        except ValueError:
            input_processor._sparsed_limits = None  # not a diffusion LM: vLLM's own rules
        else:
            input_processor._sparsed_limits = engine_limits(input_processor.vllm_config)
    return input_processor._sparsed_limits


def _admit(limits, request) -> None:
    from vllm.exceptions import VLLMValidationError

    from sparsed_vllm.vllm_glue.admission import admit_request, field_value

    sp = request.sampling_params
    try:
        admit_request(limits, sp, len(request.prompt_token_ids or ()))
    except ValueError as exc:
        name = getattr(exc, "name", None)
        value = field_value(sp, name) if name else None
        raise VLLMValidationError(str(exc), parameter=name, value=value) from exc


def in_api_server() -> bool:
    """Whether this process is vLLM's OpenAI API server (its entry modules are loaded)."""
    return any(name in sys.modules for name in _SERVER_MODULES)


def install_strict_max_tokens() -> None:
    """Patch the OpenAI handlers and request models of this process (API server only)."""
    if not in_api_server():
        return
    for name in _HANDLER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(module, "get_max_tokens", None)
        if current is not None and not getattr(current, "sparsed_strict", False):
            module.get_max_tokens = strict_max_tokens(current)
    for module_name, class_name in _REQUEST_MODELS:
        cls = getattr(importlib.import_module(module_name), class_name)
        if not getattr(cls.to_sampling_params, "sparsed_xargs_only", False):
            cls.to_sampling_params = _xargs_only(cls.to_sampling_params)


def _xargs_only(to_sampling_params):
    """Refuse diffusion fields at the top level of a request body (vLLM would drop them)."""

    @functools.wraps(to_sampling_params)
    def wrapper(self, *args, **kwargs):
        misplaced = sorted(_XARGS_KEYS & set(self.model_extra or {}))
        if misplaced:
            example = ", ".join(f'"{k}": ...' for k in misplaced)
            raise ValueError(
                f"{', '.join(misplaced)} must be sent inside vllm_xargs, e.g. "
                f'"vllm_xargs": {{{example}}}; at the top level of the body they would be ignored'
            )
        return to_sampling_params(self, *args, **kwargs)

    wrapper.sparsed_xargs_only = True
    return wrapper
