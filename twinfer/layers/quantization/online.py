"""Online quantization (`--quantization NAME`): a plain checkpoint quantized at load."""

from __future__ import annotations

from twinfer.layers.quantization.base import QuantizationConfig
from twinfer.layers.quantization.online_fp8 import OnlineFp8Config
from twinfer.layers.quantization.online_int4 import OnlineInt4Config

# `sym_int4`: the name the systems twinfer grew from use for the same int4 scheme.
ONLINE_METHODS: dict[str, type[QuantizationConfig]] = {
    "fp8": OnlineFp8Config,
    "int4": OnlineInt4Config,
    "sym_int4": OnlineInt4Config,
}
