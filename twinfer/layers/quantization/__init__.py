"""Weight formats (vLLM's quantization methods), chosen once from a checkpoint's
`quantization_config`: each gives every linear layer the `LinearMethod` that stores and applies
its weight. A new format is one module here, registered in `_METHODS`."""

from __future__ import annotations

from typing import Any

from twinfer.layers.quantization.awq_gptq import AwqConfig, GptqConfig
from twinfer.layers.quantization.base import (
    ExpertTensors,
    LinearMethod,
    MoEMethod,
    QuantizationConfig,
)
from twinfer.layers.quantization.compressed_tensors import CompressedTensorsConfig
from twinfer.layers.quantization.fp8 import Fp8Config
from twinfer.layers.quantization.online import ONLINE_METHODS
from twinfer.layers.quantization.unquantized import UnquantizedConfig, UnquantizedLinearMethod

__all__ = [
    "ExpertTensors",
    "LinearMethod",
    "MoEMethod",
    "QuantizationConfig",
    "UnquantizedConfig",
    "UnquantizedLinearMethod",
    "ONLINE_METHODS",
    "get_quantization_config",
]

_METHODS: dict[str, type[QuantizationConfig]] = {
    "awq": AwqConfig,
    "compressed-tensors": CompressedTensorsConfig,
    "fp8": Fp8Config,
    "gptq": GptqConfig,
}


def get_quantization_config(hf_quant_config: Any, online: str | None = None) -> QuantizationConfig:
    """The format of a checkpoint from its config.json `quantization_config` (None: plain), or
    `online` (--quantization) to quantize a plain checkpoint at load."""
    if online is not None:
        if online not in ONLINE_METHODS:
            raise ValueError(
                f"--quantization {online!r} is not supported; choose one of "
                f"{', '.join(ONLINE_METHODS)} (quantized checkpoints need no flag)."
            )
        if hf_quant_config is not None:
            raise ValueError(
                f"--quantization {online}: this checkpoint is already quantized; drop the flag "
                "(its own format is read from quantization_config)."
            )
        return ONLINE_METHODS[online]()
    if hf_quant_config is None:
        return UnquantizedConfig()
    if not isinstance(hf_quant_config, dict):
        to_dict = getattr(hf_quant_config, "to_dict", None)
        hf_quant_config = to_dict() if to_dict is not None else vars(hf_quant_config)
    method = str(hf_quant_config.get("quant_method", "")).lower()
    if method not in _METHODS:
        raise ValueError(
            f"this checkpoint is quantized with quant_method {method!r}, which twinfer does not "
            f"load yet; supported: {', '.join(sorted(_METHODS))} (or an unquantized checkpoint)."
        )
    return _METHODS[method].from_config(hf_quant_config)
