"""Reference attention in plain torch over the paged KV cache (the CPU path).

Legend: `T` tokens, `S` sequences, `Hq`/`Hkv` heads, `D` head size, `L` context length, `Tq` a
sequence's query tokens this step.

Every sequence runs its own SDPA call over its own context: a decoding sequence (one query token)
with no mask, a prefill chunk with a causal mask offset by its cached context. Gather indices and
masks are built once a step, shared by every layer.

NOTE: one call per sequence, not one padded batch, so a sequence's attention is computed exactly
as it would be alone: SDPA's CPU kernel splits the keys by the padded length, and a batched,
masked decode gave a sequence different last bits beside longer neighbours (bf16), which flipped
seeded samples under load. At batch 16 the loop measured faster than the masked batch (6.0 vs
8.5 ms a layer in bf16, 1.2 vs 1.3 in fp32, AVX2); at batch 2 ~25% slower on attention alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twinfer.layers.attention.backend import (
    AttentionBackend,
    CommonAttentionMetadata,
    register_attn_backend,
)


@dataclass(slots=True)
class SeqAttention:
    """One sequence's part of the step: its query tokens and the cache slots it attends to."""

    token_start: int
    token_end: int
    slots: torch.Tensor  # [L] flat cache slots of the whole context
    mask: torch.Tensor | None  # [Tq, L] bool for a chunk after cached context, else None
    causal: bool  # a prefill from position 0 (plain causal); False for decodes and masked chunks


@dataclass(slots=True)
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    seqs: list[SeqAttention]


@register_attn_backend
class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        bs = common.block_size
        block_table = common.block_table
        dev = block_table.device
        seqs = []
        for s, q_len in enumerate(common.query_lens):
            seq_len = common.seq_lens[s]
            pos = torch.arange(seq_len, device=dev)
            slots = block_table[s, pos // bs] * bs + pos % bs
            context = seq_len - q_len
            mask = None
            if context > 0 and q_len > 1:
                q_pos = torch.arange(context, seq_len, device=dev)
                mask = pos[None, :] <= q_pos[:, None]
            start = common.query_start_loc[s]
            # A decode attends to its whole context: no mask (SDPA's fastest path).
            causal = context == 0 and q_len > 1
            seqs.append(SeqAttention(start, start + q_len, slots, mask, causal))
        return TorchAttentionMetadata(slot_mapping=common.slot_mapping, seqs=seqs)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        t, hq, d = q.shape
        hkv = k.shape[1]
        # [2, B, block_size, Hkv, D] -> two flat [B * block_size, Hkv, D] views.
        k_cache = kv_cache[0].view(-1, hkv, d)
        v_cache = kv_cache[1].view(-1, hkv, d)
        _store(k_cache, metadata.slot_mapping, k)
        _store(v_cache, metadata.slot_mapping, v)

        out = torch.empty_like(q)
        for seq in metadata.seqs:
            qs = q[seq.token_start : seq.token_end].transpose(0, 1)  # [Hq, Tq, D]
            ks = _gather(k_cache, seq.slots, q.dtype).transpose(0, 1)  # [Hkv, L, D]
            vs = _gather(v_cache, seq.slots, q.dtype).transpose(0, 1)
            o = F.scaled_dot_product_attention(
                qs,
                ks,
                vs,
                attn_mask=seq.mask,
                is_causal=seq.causal,
                scale=scale,
                enable_gqa=hq != hkv,
            )
            out[seq.token_start : seq.token_end] = o.transpose(0, 1)
        return out


# NOTE: an fp8 cache (--kv-cache-dtype) is moved as its bytes: torch's CPU index_copy_ and
# gathers have no float8 kernels, and a byte view copies the same values.
def _store(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache[slots] = x in the cache's dtype. cache [S, Hkv, D], x [T, Hkv, D], slots [T]."""
    if cache.element_size() == 1 and cache.dtype.is_floating_point:
        cache.view(torch.uint8).index_copy_(0, slots, x.to(cache.dtype).view(torch.uint8))
    else:
        cache.index_copy_(0, slots, x.to(cache.dtype))


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[slots] in `dtype`: [L, Hkv, D]."""
    if cache.element_size() == 1 and cache.dtype.is_floating_point:
        return cache.view(torch.uint8)[slots].view(cache.dtype).to(dtype)
    return cache[slots].to(dtype)
