"""Reference attention in plain torch over the paged KV cache (the CPU path).

Legend: `T` tokens, `S` sequences, `Bd` decoding sequences, `Hq`/`Hkv` heads, `G` = Hq / Hkv,
`D` head size, `L` context length.

Decoding sequences (one query token each) run as one batched, masked GQA matmul; sequences with
several query tokens (prefill chunks) run one SDPA call each with a causal mask offset by their
cached context. Gather indices and masks are built once a step, shared by every layer.
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
class PrefillSeq:
    token_start: int
    token_end: int
    slots: torch.Tensor  # [L] flat cache slots of the whole context
    mask: torch.Tensor | None  # [Tq, L] bool, None when the context starts at 0 (plain causal)


@dataclass(slots=True)
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    decode_tokens: torch.Tensor | None  # [Bd] token index of each decoding sequence
    decode_slots: torch.Tensor | None  # [Bd * Lmax] flat cache slots, padded with slot 0
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, Lmax] True where a key is attended
    decode_max_len: int
    prefills: list[PrefillSeq]


@register_attn_backend
class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        bs = common.block_size
        block_table = common.block_table
        dev = block_table.device
        decode_rows = [s for s, q in enumerate(common.query_lens) if q == 1]
        decode_tokens = decode_slots = decode_mask = None
        max_len = 0
        if decode_rows:
            rows = torch.tensor(decode_rows, dtype=torch.long, device=dev)
            lens = torch.tensor([common.seq_lens[s] for s in decode_rows], device=dev)
            max_len = int(max(common.seq_lens[s] for s in decode_rows))
            pos = torch.arange(max_len, device=dev)
            # [Bd, Lmax] slot of each context position, via the block table.
            blocks = block_table[rows][:, pos // bs]
            valid = pos[None, :] < lens[:, None]
            decode_slots = torch.where(valid, blocks * bs + pos % bs, 0).reshape(-1)
            # One sequence attends to its whole context: no mask (SDPA's fastest path).
            decode_mask = valid[:, None, None, :] if len(decode_rows) > 1 else None
            decode_tokens = torch.tensor(
                [common.query_start_loc[s] for s in decode_rows], dtype=torch.long, device=dev
            )
        prefills = []
        for s, q_len in enumerate(common.query_lens):
            if q_len == 1:
                continue
            seq_len = common.seq_lens[s]
            pos = torch.arange(seq_len, device=dev)
            slots = block_table[s, pos // bs] * bs + pos % bs
            context = seq_len - q_len
            mask = None
            if context > 0:
                q_pos = torch.arange(context, seq_len, device=dev)
                mask = pos[None, :] <= q_pos[:, None]
            start = common.query_start_loc[s]
            prefills.append(PrefillSeq(start, start + q_len, slots, mask))
        return TorchAttentionMetadata(
            slot_mapping=common.slot_mapping,
            decode_tokens=decode_tokens,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            decode_max_len=max_len,
            prefills=prefills,
        )

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
        k_cache.index_copy_(0, metadata.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, metadata.slot_mapping, v.to(v_cache.dtype))

        out = torch.empty_like(q)
        if metadata.decode_tokens is not None:
            out[metadata.decode_tokens] = self._decode(q, k_cache, v_cache, metadata, scale)
        for seq in metadata.prefills:
            qs = q[seq.token_start : seq.token_end].transpose(0, 1)  # [Hq, Tq, D]
            ks = k_cache[seq.slots].transpose(0, 1).to(q.dtype)  # [Hkv, L, D]
            vs = v_cache[seq.slots].transpose(0, 1).to(q.dtype)
            o = F.scaled_dot_product_attention(
                qs,
                ks,
                vs,
                attn_mask=seq.mask,
                is_causal=seq.mask is None,
                scale=scale,
                enable_gqa=hq != hkv,
            )
            out[seq.token_start : seq.token_end] = o.transpose(0, 1)
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: TorchAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [Bd, Hq, D]
        _, hq, d = q.shape
        hkv = k_cache.shape[1]
        bd = metadata.decode_tokens.shape[0]
        length = metadata.decode_max_len
        qd = q[metadata.decode_tokens].view(bd, hq, 1, d)
        kd = k_cache[metadata.decode_slots].view(bd, length, hkv, d).transpose(1, 2)
        vd = v_cache[metadata.decode_slots].view(bd, length, hkv, d).transpose(1, 2)
        # NOTE: SDPA (GQA without expanding K/V) measured 1.5-5x faster than an explicit
        # grouped matmul + softmax for bf16 decode on the CPU.
        out = F.scaled_dot_product_attention(
            qd,
            kd.to(q.dtype),
            vd.to(q.dtype),
            attn_mask=metadata.decode_mask,
            scale=scale,
            enable_gqa=hq != hkv,
        )
        return out.view(bd, hq, d)
