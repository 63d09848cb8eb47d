"""The `vllm.general_plugins` entry point: registers configs, models and the config hook.

vLLM calls it in every process (front end, engine core, each worker, Ray actors). It is
idempotent and imports no CUDA: models are registered as lazy "module:Class" strings.
"""

from __future__ import annotations

_MODELS = {
    "LLaDAModelLM": "sparsed_vllm.model_executor.models.llada:LLaDAModelLM",
    "DreamModel": "sparsed_vllm.model_executor.models.dream:DreamModel",
}

_ATTENTION_BACKEND = "sparsed_vllm.vllm_glue.attention.DiffusionAttentionBackend"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from sparsed_vllm.configs import register_configs
    from sparsed_vllm.vllm_glue.config_hook import DiffusionLMConfig

    register_configs()
    for arch, path in _MODELS.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, path)
        MODELS_CONFIG_MAP[arch] = DiffusionLMConfig
    # The models pass this backend to their attention layers directly (the CPU platform ignores
    # --attention-backend); registering it under CUSTOM makes the name resolvable as well.
    register_backend(AttentionBackendEnum.CUSTOM, _ATTENTION_BACKEND)
    _registered = True
