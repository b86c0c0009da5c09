"""The torch paged-attention backend against plain causal attention on contiguous tensors."""

from __future__ import annotations

import random

import pytest
import torch

from twinfer.layers.attention import CommonAttentionMetadata, KVCacheSpec, get_attn_backend


def reference(q, k, v, scale):  # q [L, Hq, D], k/v [L, Hkv, D]: the full sequence, causal
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_chunked_steps_match_full_causal_attention(block_size: int, heads) -> None:
    torch.manual_seed(0)
    rng = random.Random(block_size)
    hq, hkv, d = *heads, 16
    backend = get_attn_backend("torch")
    spec = KVCacheSpec(hkv, d, torch.float32)
    num_blocks = 256
    cache = torch.zeros(backend.kv_cache_shape(spec, num_blocks, block_size))
    lengths = [1, 5, 17, 33, 64]
    seqs = []
    free = list(range(num_blocks))
    rng.shuffle(free)
    for length in lengths:
        nb = -(-length // block_size)
        seqs.append(
            {
                "q": torch.randn(length, hq, d),
                "k": torch.randn(length, hkv, d),
                "v": torch.randn(length, hkv, d),
                "blocks": [free.pop() for _ in range(nb)],
                "done": 0,
                "out": torch.zeros(length, hq, d),
            }
        )
    # Feed every sequence in random chunks (1 = decode), several sequences per step.
    while any(s["done"] < s["q"].shape[0] for s in seqs):
        active = [s for s in seqs if s["done"] < s["q"].shape[0]]
        step = rng.sample(active, k=rng.randint(1, len(active)))
        qs, ks, vs, slots, qsl, qlens, slens = [], [], [], [], [0], [], []
        for s in step:
            n = min(rng.choice([1, 1, 3, 8, 40]), s["q"].shape[0] - s["done"])
            lo, hi = s["done"], s["done"] + n
            qs.append(s["q"][lo:hi]), ks.append(s["k"][lo:hi]), vs.append(s["v"][lo:hi])
            slots += [
                s["blocks"][p // block_size] * block_size + p % block_size for p in range(lo, hi)
            ]
            qsl.append(qsl[-1] + n), qlens.append(n), slens.append(hi)
        width = max(len(s["blocks"]) for s in step)
        table = torch.zeros(len(step), width, dtype=torch.long)
        for i, s in enumerate(step):
            table[i, : len(s["blocks"])] = torch.tensor(s["blocks"])
        common = CommonAttentionMetadata(qsl, qlens, slens, table, torch.tensor(slots), block_size)
        out = backend.forward(
            torch.cat(qs),
            torch.cat(ks),
            torch.cat(vs),
            cache,
            backend.build_metadata(common),
            d**-0.5,
        )
        for i, s in enumerate(step):
            s["out"][slens[i] - qlens[i] : slens[i]] = out[qsl[i] : qsl[i + 1]]
            s["done"] = slens[i]
    for s in seqs:
        torch.testing.assert_close(
            s["out"], reference(s["q"], s["k"], s["v"], d**-0.5), atol=1e-5, rtol=1e-5
        )
