"""Architecture name (config.json "architectures") -> model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODELS)


def get_model_class(architectures: list[str]) -> type[nn.Module]:
    """The class of the first supported entry of config.json's `architectures`."""
    for arch in architectures or []:
        if arch in _MODELS:
            module_name, class_name = _MODELS[arch]
            module = importlib.import_module(f"twinfer.models.{module_name}")
            return getattr(module, class_name)
    raise ValueError(
        f"model architecture {', '.join(architectures or []) or '(none given)'} is not supported "
        f"by twinfer; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}."
    )
