"""The `Attention` layer models use: paged KV cache + backend chosen by the registry."""

from __future__ import annotations

import torch
from torch import nn

from twinfer.layers.attention.backend import KVCacheSpec, get_attn_backend
from twinfer.layers.attention.context import get_attn_metadata


class Attention(nn.Module):
    """Causal self-attention of one layer over its paged KV cache.

    q [T, Hq*D], k/v [T, Hkv*D] (RoPE already applied) -> [T, Hq*D]. The runner binds `kv_cache`
    after sizing the pool; the per-step metadata comes from the forward context.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{prefix}: {self.num_heads} query heads are not a multiple of "
                f"{self.num_kv_heads} KV heads; config.json is inconsistent."
            )
        self.scale = scale
        self.prefix = prefix
        self.backend = get_attn_backend()
        self.kv_cache = torch.empty(0)

    def kv_cache_spec(self, dtype: torch.dtype) -> KVCacheSpec:
        return KVCacheSpec(num_kv_heads=self.num_kv_heads, head_size=self.head_size, dtype=dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        out = self.backend.forward(
            q.view(t, self.num_heads, self.head_size),
            k.view(t, self.num_kv_heads, self.head_size),
            v.view(t, self.num_kv_heads, self.head_size),
            self.kv_cache,
            get_attn_metadata(),
            self.scale,
        )
        return out.reshape(t, self.num_heads * self.head_size)
