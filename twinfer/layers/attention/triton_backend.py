"""Triton attention over the paged KV cache (the GPU path).

Legend: `T` tokens of the step, `S` sequences, `Hq`/`Hkv` query/KV heads, `D` head size.

A step writes its K/V into the cache, then runs one kernel: split-K decode when every sequence
has exactly one query token, else the varlen kernel for all sequences (prefill, chunked prefill,
prefix hits and decode rows alike). Kernels live in `triton_kernels.py`. An fp8 cache
(--kv-cache-dtype) takes the same path: the kernels write and read its bytes (a constexpr switch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton  # noqa: F401  (the registry imports this module only when triton is present)

from twinfer.layers.attention.backend import (
    AttentionBackend,
    CommonAttentionMetadata,
    register_attn_backend,
)
from twinfer.layers.attention.triton_kernels import (
    decode_attention,
    reshape_and_cache,
    varlen_attention,
)


@dataclass(slots=True)
class TritonAttentionMetadata:
    """What the kernels read. NOTE: only references to the runner's tensors plus Python scalars
    that depend on shapes and bounds: a CUDA graph keeps the object built at capture time while
    the runner rewrites the tensors' contents in place before each replay."""

    slot_mapping: torch.Tensor  # [T] int64, -1 skips (padded rows)
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32, 0 for padded rows
    block_table: torch.Tensor  # [S, max_blocks] int64
    num_seqs: int
    max_query_len: int
    max_seq_len: int  # upper bound of seq_lens: sizes the decode grid
    # Decode splits per (sequence, KV head); 0 = chosen per layer from its Hkv and the SM count.
    num_splits: int = 0


@register_attn_backend
class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        dev = common.block_table.device
        query_start_loc = common.query_start_loc_tensor
        if query_start_loc is None:
            query_start_loc = torch.tensor(common.query_start_loc, dtype=torch.int32, device=dev)
        seq_lens = common.seq_lens_tensor
        if seq_lens is None:
            seq_lens = torch.tensor(common.seq_lens, dtype=torch.int32, device=dev)
        return TritonAttentionMetadata(
            slot_mapping=common.slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=common.block_table,
            num_seqs=common.num_seqs,
            max_query_len=common.max_query_len,
            max_seq_len=common.max_seq_len,
        )

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        metadata: TritonAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        # NOTE: T == S rules out sequences with no query token, which the decode grid (token
        # index == sequence index) cannot express; the varlen kernel takes them.
        if metadata.max_query_len == 1 and q.shape[0] == metadata.num_seqs:
            # The decode kernel writes this step's K/V itself: one launch fewer per layer.
            return decode_attention(
                q,
                kv_cache,
                metadata.seq_lens,
                metadata.block_table,
                scale,
                metadata.max_seq_len,
                metadata.num_splits,
                new_kv=(k, v, metadata.slot_mapping),
            )
        reshape_and_cache(k, v, kv_cache, metadata.slot_mapping)
        return varlen_attention(
            q,
            kv_cache,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.block_table,
            scale,
            metadata.max_query_len,
        )
