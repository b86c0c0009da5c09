"""The forward context: per-step attention metadata that `Attention` layers read.

NOTE: a context (as in vLLM and nano-vllm) keeps model files free of plumbing: `forward(input_ids,
positions)` is all a model sees, and one step's metadata is built once for all layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_attn_metadata: Any = None


@contextmanager
def set_forward_context(attn_metadata: Any) -> Iterator[None]:
    global _attn_metadata
    previous, _attn_metadata = _attn_metadata, attn_metadata
    try:
        yield
    finally:
        _attn_metadata = previous


def get_attn_metadata() -> Any:
    if _attn_metadata is None:
        raise RuntimeError("Attention ran outside set_forward_context(); the model runner sets it.")
    return _attn_metadata
