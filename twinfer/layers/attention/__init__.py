"""Attention: the `Attention` layer, its backend registry and the forward context."""

from __future__ import annotations

from twinfer.layers.attention.backend import (
    AttentionBackend,
    CommonAttentionMetadata,
    KVCacheSpec,
    get_attn_backend,
    register_attn_backend,
    select_attn_backend,
)
from twinfer.layers.attention.context import get_attn_metadata, set_forward_context
from twinfer.layers.attention.layer import Attention

__all__ = [
    "Attention",
    "AttentionBackend",
    "CommonAttentionMetadata",
    "KVCacheSpec",
    "get_attn_backend",
    "get_attn_metadata",
    "register_attn_backend",
    "select_attn_backend",
    "set_forward_context",
]
