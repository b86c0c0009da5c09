"""Attention backend interface, registry, and the per-step metadata every backend starts from.

Legend: `T` tokens of the step, `S` sequences, `Hq`/`Hkv` query/KV heads, `D` head size,
`B` KV blocks, `L` context length.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """What one attention layer stores per token in the paged cache.

    Full attention stores K and V (`num_entries=2`) of `[num_kv_heads, head_size]`; MLA will
    store one compressed latent (`num_entries=1`, `num_kv_heads=1`, `head_size=kv_lora_rank +
    rope_dim`), so the block pool counts blocks and each layer's backend decides the layout.
    """

    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    num_entries: int = 2

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_entries * self.num_kv_heads * self.head_size * itemsize


@dataclass(slots=True)
class CommonAttentionMetadata:
    """Batch layout of one step, built once by the model runner and shared by all layers.

    Tokens of sequence `s` are `query_start_loc[s]:query_start_loc[s+1]` in the flattened batch;
    they sit at positions `seq_lens[s] - query_lens[s] ...` of that sequence. Python lists mirror
    the tensors so backends never sync on `.item()`.
    """

    query_start_loc: list[int]  # [S+1]
    query_lens: list[int]  # [S]
    seq_lens: list[int]  # [S] context length after this step
    block_table: torch.Tensor  # [S, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot = block * block_size + offset; -1 skips
    block_size: int
    # Device mirrors of the lists, for kernels (the runner fills them on a GPU).
    query_start_loc_tensor: torch.Tensor | None = None  # [S+1] int32
    seq_lens_tensor: torch.Tensor | None = None  # [S] int32
    # Upper bound of seq_lens, for grids: 0 means max(seq_lens). A captured CUDA graph sets
    # max_model_len, since one graph replays for every context length.
    max_seq_len: int = 0

    def __post_init__(self) -> None:
        if self.max_seq_len == 0:
            self.max_seq_len = max(self.seq_lens, default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)


class AttentionBackend(ABC):
    """Kernels for attention over a paged KV cache. Model files never see which one runs."""

    name: str = ""

    @staticmethod
    def kv_cache_shape(spec: KVCacheSpec, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (spec.num_entries, num_blocks, block_size, spec.num_kv_heads, spec.head_size)

    @abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Per-step, layer-independent preparation (index tensors, masks), done once a step."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,
        metadata: Any,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Write this step's K/V into the cache, then attend over each sequence's context."""


_BACKENDS: dict[str, type[AttentionBackend]] = {}
_selected: str = "torch"


def register_attn_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _BACKENDS[cls.name] = cls
    return cls


# Built-in backends, imported on first use: importing triton costs a second a CPU run never needs.
_BUILTIN = {
    "torch": "twinfer.layers.attention.torch_backend",
    "triton": "twinfer.layers.attention.triton_backend",
}


def select_attn_backend(name: str) -> None:
    """Choose the backend that `Attention` layers built from now on use."""
    global _selected
    _ensure_backend(name)
    _selected = name


def get_attn_backend(name: str | None = None) -> AttentionBackend:
    name = name or _selected
    _ensure_backend(name)
    return _BACKENDS[name]()


def _ensure_backend(name: str) -> None:
    # NOTE: imported here, not at module top, so backends can import this module freely.
    if name not in _BACKENDS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _BACKENDS:
        known = sorted(set(_BACKENDS) | set(_BUILTIN))
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(known)}.")
