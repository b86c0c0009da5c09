"""Rotary position embedding (neox style, HF's rotate_half) with a cos/sin cache built once.

Shapes: `T` tokens, `D` head size, `P` max positions. Supported rope types: default, linear, llama3
(inverse frequencies computed exactly as transformers' ROPE_INIT_FUNCTIONS do).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from twinfer.layers.cuda_ops import cuda_ops
from twinfer.layers.norm import RMSNorm

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """rope_type, rope_theta and scaling keys from a transformers 5 (`rope_parameters`) or
    transformers 4 (`rope_theta` + `rope_scaling`) config."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope parameters are not supported by twinfer yet.")
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    if params["rope_type"] == "llama3" and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = getattr(
            config, "original_max_position_embeddings", config.max_position_embeddings
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor {partial} is not supported by twinfer yet.")
    return params


def compute_inv_freq(head_size: int, params: dict[str, Any]) -> Tensor:
    """[D/2] float32 inverse frequencies for the rope type in `params` (on the CPU)."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; twinfer supports: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    base = float(params["rope_theta"])
    exponent = torch.arange(0, head_size, 2, dtype=torch.int64, device="cpu").float() / head_size
    inv_freq = 1.0 / (base**exponent)
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        factor = params["factor"]
        low_freq_factor = params["low_freq_factor"]
        high_freq_factor = params["high_freq_factor"]
        old_context_len = params["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        band = high_freq_factor - low_freq_factor
        smooth = (old_context_len / wavelen - low_freq_factor) / band
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotates q and k per head by position: `forward(positions [T], q [T, n*D], k [T, m*D])`.

    The cache `cos_sin_cache` [P, D] holds cos then sin of the D/2 frequencies, in float32; it is a
    non-persistent buffer (never in a checkpoint). One instance is shared by all layers of a model.
    """

    def __init__(self, head_size: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        if head_size % 2:
            raise ValueError(f"rotary head size must be even, got {head_size}.")
        self.head_size = head_size
        self.max_position = max_position
        self.rope_type = params["rope_type"]
        inv_freq = compute_inv_freq(head_size, params)  # [D/2]
        # NOTE: built on the CPU in float32 like HF's inv_freq/positions product, then moved to the
        # default device; cos/sin are cast to the activation dtype at use, as HF does.
        t = torch.arange(max_position, dtype=torch.int64, device="cpu").float()
        freqs = t[:, None] * inv_freq[None, :]  # [P, D/2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [P, D]
        cache = cache.to(torch.get_default_device())
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._step_key: tuple[Tensor, torch.dtype] | None = None
        self._step_cos_sin: tuple[Tensor, Tensor] = (cache, cache)

    @classmethod
    def from_config(cls, config: Any, head_size: int) -> RotaryEmbedding:
        return cls(head_size, config.max_position_embeddings, rope_parameters(config))

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        t, d = x.shape[0], self.head_size
        x = x.view(t, -1, d)  # [T, n, D]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        # Same elementwise ops as HF's q * cos + rotate_half(q) * sin, so results match bitwise.
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.view(t, -1)

    def _cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # NOTE: every layer of a step rotates at the same positions; gather and cast once.
        key = self._step_key
        if key is None or key[0] is not positions or key[1] != dtype:
            cos_sin = self.cos_sin_cache.index_select(0, positions)  # [T, D]
            cos, sin = cos_sin.chunk(2, dim=-1)  # [T, D/2] each
            self._step_cos_sin = (cos[:, None, :].to(dtype), sin[:, None, :].to(dtype))
            self._step_key = (positions, dtype)
        return self._step_cos_sin  # [T, 1, D/2] each

    def forward(
        self,
        positions: Tensor,
        q: Tensor,
        k: Tensor,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Rotate q [T, nq*D] and k [T, nkv*D]; with q_norm/k_norm (Qwen3) each head is first
        RMS-normed over its D values (one fused kernel on a GPU)."""
        if (ops := cuda_ops(q)) is not None:
            return ops.rotary_embedding(
                positions,
                q,
                k,
                self.cos_sin_cache,
                self.head_size,
                q_norm_weight=None if q_norm is None else q_norm.weight,
                k_norm_weight=None if k_norm is None else k_norm.weight,
                eps=1e-6 if q_norm is None else q_norm.variance_epsilon,
            )
        t, d = q.shape[0], self.head_size
        if q_norm is not None:
            q = q_norm(q.reshape(t, -1, d)).reshape(t, -1)  # [T, nq D]
        if k_norm is not None:
            k = k_norm(k.reshape(t, -1, d)).reshape(t, -1)  # [T, nkv D]
        cos, sin = self._cos_sin(positions, q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, max_position={self.max_position}, {self.rope_type}"
