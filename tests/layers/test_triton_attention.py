"""The Triton attention backend against the torch backend on the same paged cache and metadata.

Legend: `T` tokens, `S` sequences, `Hq`/`Hkv` heads, `D` head size, `NB` cache blocks.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET): small
shapes in float32 (exact dots, tight tolerance) and float16. With a GPU the same tests run
compiled, and the `gpu` tests add bf16/fp16 at model shapes, long contexts and CUDA graphs. The
reference is always the torch backend in float32 on the same K/V values. An fp8 cache
(--kv-cache-dtype) is one both backends write and read: the reference keeps it fp8, so both
attend to the same stored values and the caches they leave agree byte for byte.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from twinfer.layers.attention import CommonAttentionMetadata, get_attn_backend  # noqa: E402
from twinfer.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from twinfer.layers.attention.triton_kernels import (  # noqa: E402
    decode_num_splits,
    reshape_and_cache,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@dataclass
class Step:
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor  # [T, Hkv, D]
    cache: torch.Tensor  # [2, NB, bs, Hkv, D], random: the cached context (and finite garbage)
    common: CommonAttentionMetadata  # every row, padded ones included
    real: CommonAttentionMetadata  # rows with a query token and a context, for the reference


def runner_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    tables: list[list[int]],
    block_size: int,
    device: str,
    width: int = 0,
    max_seq_len: int = 0,
) -> CommonAttentionMetadata:
    """CommonAttentionMetadata as ModelRunner.execute_model builds it (plus its device mirrors);
    rows with seq_len 0 are CUDA-graph padding: slot -1, no context."""
    query_start_loc, slots = [0], []
    for q_len, seq_len, blocks in zip(query_lens, seq_lens, tables, strict=True):
        query_start_loc.append(query_start_loc[-1] + q_len)
        if seq_len == 0:
            slots += [-1] * q_len
        else:
            pos = range(seq_len - q_len, seq_len)
            slots += [blocks[p // block_size] * block_size + p % block_size for p in pos]
    table = torch.zeros(len(tables), max(width, 1, *map(len, tables)), dtype=torch.long)
    for i, blocks in enumerate(tables):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc,
        query_lens=list(query_lens),
        seq_lens=list(seq_lens),
        block_table=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_size=block_size,
        query_start_loc_tensor=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_seq_len=max_seq_len,
    )


def make_step(
    contexts: list[int],  # cached tokens before the step, per sequence
    query_lens: list[int],
    heads: tuple[int, int],
    d: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    pad_rows: int = 0,  # decode rows with seq_len 0 appended (CUDA-graph padding)
    kv_dtype: torch.dtype | None = None,  # the cache's dtype (default: dtype), fp8 included
) -> Step:
    hq, hkv = heads
    rng = random.Random(seed)
    gen = torch.Generator(DEVICE).manual_seed(seed)
    seq_lens = [c + q for c, q in zip(contexts, query_lens, strict=True)]
    need = [-(-n // block_size) for n in seq_lens]
    free = list(range(sum(need) + 3))
    rng.shuffle(free)  # scattered, non-monotonic blocks
    tables = [[free.pop() for _ in range(n)] for n in need]
    cache = torch.randn(2, len(free) + sum(need), block_size, hkv, d, generator=gen, device=DEVICE)
    t = sum(query_lens) + pad_rows
    q, k, v = (torch.randn(t, h, d, generator=gen, device=DEVICE).to(dtype) for h in (hq, hkv, hkv))
    real = [i for i, (q_len, n) in enumerate(zip(query_lens, seq_lens, strict=True)) if q_len and n]
    common = runner_metadata(
        query_lens + [1] * pad_rows,
        seq_lens + [0] * pad_rows,
        tables + [[free[0]]] * pad_rows,  # stale blocks in padded rows must not matter
        block_size,
        DEVICE,
    )
    sub = runner_metadata(
        [query_lens[i] for i in real], [seq_lens[i] for i in real], [tables[i] for i in real],
        block_size, DEVICE,
    )  # fmt: skip
    return Step(q, k, v, cache.to(kv_dtype or dtype), common, sub)


def run_triton(step: Step, scale: float, num_splits: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    backend = get_attn_backend("triton")
    metadata = backend.build_metadata(step.common)
    metadata.num_splits = num_splits
    cache = step.cache.clone()
    return backend.forward(step.q, step.k, step.v, cache, metadata, scale), cache


def run_reference(step: Step, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch backend in float32 over the real rows; returns ([T_real, Hq, D], cache)."""
    backend = get_attn_backend("torch")
    qsl, rows = step.common.query_start_loc, []
    lens = zip(step.common.query_lens, step.common.seq_lens, strict=True)
    for s, (q_len, n) in enumerate(lens):
        if q_len and n:
            rows += range(qsl[s], qsl[s + 1])
    q, k, v = (x[rows].float() for x in (step.q, step.k, step.v))
    cache = step.cache.clone() if step.cache.element_size() == 1 else step.cache.float()
    return backend.forward(q, k, v, cache, backend.build_metadata(step.real), scale), cache


def check(step: Step, scale: float, dtype: torch.dtype, num_splits: int = 0) -> torch.Tensor:
    out, cache = run_triton(step, scale, num_splits)
    ref, ref_cache = run_reference(step, scale)
    if cache.element_size() == 1:  # fp8: the same codes (NaN-free, so bytes compare as values)
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    else:
        torch.testing.assert_close(cache.float(), ref_cache, atol=0, rtol=0)
    real = out[: ref.shape[0]].float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(real, ref, atol=TOL[dtype], rtol=TOL[dtype])
    return out


# ---- interpreter tests (and compiled on a GPU machine) ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reshape_and_cache_writes_slots_and_skips_padding(dtype) -> None:
    torch.manual_seed(0)
    t, hq, hkv, d, bs, nb = 7, 4, 2, 24, 4, 5
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEVICE).to(dtype)  # fused projection
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)  # non-contiguous views, as models give
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    slots = torch.tensor([3, -1, 17, 0, -1, 12, 19], device=DEVICE)
    cache = torch.full((2, nb, bs, hkv, d), 7.0, dtype=dtype, device=DEVICE)
    expected = cache.clone().view(2, nb * bs, hkv, d)
    keep = slots >= 0
    expected[0, slots[keep]] = k[keep]
    expected[1, slots[keep]] = v[keep]
    reshape_and_cache(k, v, cache, slots)
    assert torch.equal(cache.view_as(expected), expected)


# NaN lanes of the discarded subnormal branch: numpy warns about their int cast.
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reshape_and_cache_fp8_codes_match_torch_cast(dtype, kv_dtype) -> None:
    # Every exponent of both formats, their subnormals, exact ties (rounded to even), values past
    # the largest finite one (e4m3fn saturates, e5m2 overflows to inf), +-inf, +-NaN and -0.0.
    gen = torch.Generator().manual_seed(1)
    mant = torch.rand(64, generator=gen) + 1.0
    grid = (mant[:, None] * 2.0 ** torch.arange(-20, 17)[None, :]).flatten()
    step = 2.0 ** torch.arange(-18, 14)  # e4m3: 2^-9 is the subnormal ulp, e5m2: 2^-16
    ties = torch.cat([step * k for k in (0.5, 1.5, 2.5, 9.5, 17.5, 35.0, 67.0)])
    special = torch.tensor([0.0, -0.0, 440.0, 448.0, 464.0, 465.0, 1e4, 57344.0, 61439.0,
                            61440.0, 7e4, float("inf"), float("nan")])  # fmt: skip
    x = torch.cat([grid, ties, special, special * 2.0**-20])
    x = torch.cat([x, -x])
    x = x[(x.abs() <= torch.finfo(dtype).max) | ~x.isfinite()].to(dtype)  # in float16's range
    hkv, d = 2, 16
    t = -(-x.numel() // (hkv * d))
    x = torch.cat([x, x.new_zeros(t * hkv * d - x.numel())]).view(t, hkv, d).to(DEVICE)
    cache = torch.zeros(2, t, 1, hkv, d, device=DEVICE).to(kv_dtype)
    slots = torch.randperm(t, generator=gen).to(DEVICE)
    reshape_and_cache(x, -x, cache, slots)
    codes = cache.view(torch.uint8).view(2, t, hkv, d)[:, slots]
    assert torch.equal(codes[0], x.to(kv_dtype).view(torch.uint8))
    assert torch.equal(codes[1], (-x).to(kv_dtype).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("block_size", "heads", "d"),
    [(1, (4, 4), 16), (4, (8, 2), 32), (16, (8, 1), 16), (4, (6, 2), 24), (16, (4, 2), 64)],
)
def test_varlen_prefill_prefix_hits_and_decode_rows(dtype, block_size, heads, d) -> None:
    # Fresh prefill, prefix hits (context > 0), decode rows and a chunk crossing many tiles.
    contexts, query_lens = [0, 21, 70, 3, 150, 0], [37, 5, 1, 19, 3, 2]
    step = make_step(contexts, query_lens, heads, d, block_size, dtype, seed=block_size + d)
    check(step, d**-0.5, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_multiple_query_tiles_and_empty_rows(dtype) -> None:
    # Long queries span several q tiles; a sequence with no query token this step and a padded
    # row (seq_len 0) produce nothing and disturb nothing.
    step = make_step([0, 9, 40, 0], [130, 0, 67, 1], (2, 1), 64, 4, dtype, seed=3, pad_rows=1)
    out = check(step, 0.125, dtype)
    assert not out[-1].any()  # the padded row: zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 8])
@pytest.mark.parametrize(
    ("block_size", "heads", "d"), [(1, (4, 4), 32), (4, (8, 2), 16), (16, (8, 1), 32)]
)
def test_decode_splits_match_torch(dtype, num_splits, block_size, heads, d) -> None:
    # Contexts at tile edges (32/64 keys), one key, and a CUDA-graph padded row (seq_len 0).
    contexts = [0, 14, 63, 64, 129, 199]
    step = make_step(contexts, [1] * 6, heads, d, block_size, dtype, seed=d, pad_rows=1)
    out = check(step, d**-0.5, dtype, num_splits)
    assert not out[-1].any()


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("block_size", "heads", "d"), [(4, (8, 2), 32), (16, (6, 2), 24)])
def test_fp8_cache_varlen_prefill_with_prefix(dtype, kv_dtype, block_size, heads, d) -> None:
    # The triton kernels write fp8 codes and read them back as the torch backend does.
    contexts, query_lens = [0, 21, 70, 3, 0], [37, 5, 1, 19, 2]
    step = make_step(contexts, query_lens, heads, d, block_size, dtype, seed=d, kv_dtype=kv_dtype)
    check(step, d**-0.5, dtype)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_cache_decode_splits(dtype, kv_dtype, num_splits) -> None:
    contexts = [0, 14, 63, 64, 129]
    step = make_step(contexts, [1] * 5, (8, 2), 32, 4, dtype, seed=4, pad_rows=1, kv_dtype=kv_dtype)
    out = check(step, 32**-0.5, dtype, num_splits)
    assert not out[-1].any()


def test_decode_batch_with_an_empty_row_takes_the_varlen_kernel() -> None:
    # max_query_len 1 but a row without a query token: T < S, which the decode grid cannot map.
    step = make_step([5, 9, 30], [1, 0, 1], (4, 2), 16, 4, torch.float32, seed=2)
    check(step, 0.25, torch.float32)


def test_decode_num_splits_fill_the_gpu_within_the_tiles() -> None:
    cpu = torch.device("cpu")  # counted as 132 SMs
    assert decode_num_splits(1, 4, 4096, 64, cpu) == 64  # 64 tiles, capped at MAX_SPLITS
    assert decode_num_splits(1, 4, 100, 64, cpu) == 2  # never more splits than tiles
    assert decode_num_splits(64, 4, 1024, 64, cpu) == 2  # 2 waves of 132 SMs
    assert decode_num_splits(512, 8, 32768, 64, cpu) == 1
    assert decode_num_splits(4, 4, 0, 64, cpu) == 1


def test_metadata_only_references_common_tensors() -> None:
    step = make_step([5, 9], [1, 1], (4, 2), 16, 4, torch.float32)
    md = get_attn_backend("triton").build_metadata(step.common)
    assert isinstance(get_attn_backend("triton"), TritonAttentionBackend)
    assert md.seq_lens is step.common.seq_lens_tensor
    assert md.query_start_loc is step.common.query_start_loc_tensor
    assert md.block_table is step.common.block_table
    assert md.slot_mapping is step.common.slot_mapping
    # Without device mirrors, the backend builds them on the block table's device.
    step.common.seq_lens_tensor = step.common.query_start_loc_tensor = None
    md = get_attn_backend("triton").build_metadata(step.common)
    assert md.seq_lens.tolist() == [6, 10] and md.query_start_loc.tolist() == [0, 1, 2]


def test_decode_metadata_reused_after_in_place_updates() -> None:
    # What a CUDA graph does: metadata built once (max_seq_len a bound, seq_lens zero), tensor
    # contents rewritten in place, the same metadata object used again.
    bound, heads, d, bs = 96, (8, 2), 16, 4
    later = make_step([40, 0, 95], [1, 1, 1], heads, d, bs, torch.float32, seed=5, pad_rows=1)
    common = later.common
    width = common.block_table.shape[1]
    capture = runner_metadata([1] * 4, [0] * 4, [[0]] * 4, bs, DEVICE, width, max_seq_len=bound)
    backend = get_attn_backend("triton")
    md = backend.build_metadata(capture)
    capture.seq_lens_tensor.copy_(common.seq_lens_tensor)
    capture.block_table.copy_(common.block_table)
    capture.slot_mapping.copy_(common.slot_mapping)
    cache = later.cache.clone()
    out = backend.forward(later.q, later.k, later.v, cache, md, d**-0.5)
    ref, _ = run_reference(later, d**-0.5)
    torch.testing.assert_close(out[:3], ref, atol=1e-5, rtol=1e-5)
    assert not out[3].any()


@pytest.mark.parametrize("kv_dtype", [torch.float32, *FP8])
def test_chunked_steps_match_torch_backend(kv_dtype) -> None:
    # Several steps over one cache: prefill chunks, then decodes, each backend on its own cache
    # (an fp8 one: keys written by one step are read back by the next).
    rng = random.Random(0)
    hq, hkv, d, bs = 4, 2, 16, 4
    lengths, chunks = [23, 9, 41], {0: [8, 15], 1: [9], 2: [1, 30, 10]}
    blocks = list(range(40))
    rng.shuffle(blocks)
    tables = [[blocks.pop() for _ in range(-(-n // bs) + 1)] for n in lengths]
    caches = {"triton": torch.zeros(2, 40, bs, hkv, d, device=DEVICE).to(kv_dtype)}
    caches["torch"] = caches["triton"].clone()
    done = [0, 0, 0]
    for step in range(5):
        q_lens = [chunks[s][step] if step < len(chunks[s]) else 1 for s in range(3)]
        seq_lens = [done[s] + q_lens[s] for s in range(3)]
        common = runner_metadata(q_lens, seq_lens, tables, bs, DEVICE)
        t = sum(q_lens)
        q, k, v = (torch.randn(t, h, d, device=DEVICE) for h in (hq, hkv, hkv))
        outs = {}
        for name, cache in caches.items():
            backend = get_attn_backend(name)
            outs[name] = backend.forward(q, k, v, cache, backend.build_metadata(common), 0.25)
        torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-5, rtol=1e-5)
        done = seq_lens
    assert torch.equal(caches["triton"].view(torch.uint8), caches["torch"].view(torch.uint8))


# ---- GPU tests: model shapes, bf16/fp16, long contexts, CUDA graphs ----
GPU_HEADS = [(32, 4), (16, 16), (8, 1)]
HALF = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("heads", GPU_HEADS)
def test_gpu_varlen_mixed_batch(dtype, d, heads) -> None:
    rng = random.Random(d * heads[0])
    # A fresh prompt, prefix hits, odd chunk lengths, decode rows and a long-context chunk.
    contexts = [0, rng.randrange(1, 3000), rng.randrange(1, 200), 0, rng.randrange(4000, 9000)]
    query_lens = [rng.randrange(300, 1100) | 1, rng.randrange(1, 400), 1, 2, 777]
    block_size = rng.choice([16, 16, 32, 1, 128])
    step = make_step(contexts, query_lens, heads, d, block_size, dtype, seed=d)
    check(step, d**-0.5, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("heads", GPU_HEADS)
def test_gpu_decode_long_contexts(dtype, d, heads) -> None:
    rng = random.Random(d + heads[1])
    contexts = [0, 62, 63, 1023, rng.randrange(1, 4096), 4096, rng.randrange(8000, 16383), 16383]
    block_size = rng.choice([16, 16, 32, 64])
    step = make_step(contexts, [1] * 8, heads, d, block_size, dtype, seed=d, pad_rows=3)
    out = check(step, d**-0.5, dtype)
    assert not out[-3:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_gpu_decode_forced_splits(num_splits) -> None:
    step = make_step([5, 700, 3000, 12000], [1] * 4, (32, 4), 128, 16, torch.bfloat16, seed=1)
    check(step, 128**-0.5, torch.bfloat16, num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
def test_gpu_prefill_long_prompt_with_prefix(dtype) -> None:
    step = make_step([0, 6000], [2048, 1537], (32, 4), 128, 16, dtype, seed=7)
    check(step, 128**-0.5, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_fp8_cache_varlen_and_decode(kv_dtype, d) -> None:
    # bf16 queries over an fp8 cache at model shapes: a mixed batch, then long-context decodes.
    rng = random.Random(d)
    contexts = [0, rng.randrange(1, 3000), 0, rng.randrange(4000, 9000)]
    query_lens = [777, rng.randrange(1, 400), 2, 1]
    bf16 = torch.bfloat16
    step = make_step(contexts, query_lens, (32, 4), d, 16, bf16, seed=d, kv_dtype=kv_dtype)
    check(step, d**-0.5, bf16)
    contexts = [0, 63, 1023, 4096, rng.randrange(8000, 16383)]
    step = make_step(contexts, [1] * 5, (8, 1), d, 32, bf16, seed=d, pad_rows=2, kv_dtype=kv_dtype)
    out = check(step, d**-0.5, bf16)
    assert not out[-2:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_decode_cuda_graph_replay_matches_eager(kv_dtype) -> None:
    hq, hkv, d, bs, size, max_model_len = 32, 4, 128, 16, 8, 8192
    width = max_model_len // bs
    scale = d**-0.5
    backend = get_attn_backend("triton")
    # Static buffers, as CudaGraphRunner keeps them: captured with every row padded.
    capture = runner_metadata(
        [1] * size, [0] * size, [[0]] * size, bs, "cuda", width, max_model_len
    )
    q = torch.zeros(size, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.zeros(size, hkv, d, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    cache = torch.randn(2, size * width + 1, bs, hkv, d, device="cuda").to(kv_dtype)
    md = backend.build_metadata(capture)
    backend.forward(q, k, v, cache, md, scale)  # warm-up: Triton compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, md, scale)
    for seed, lens in enumerate([[5, 100, 1, 4097, 8192, 63], [17, 2, 3000], [8192] * size]):
        rng = random.Random(seed)
        free = list(range(size * width + 1))
        rng.shuffle(free)
        tables = [[free.pop() for _ in range(-(-n // bs))] for n in lens]
        pad = size - len(lens)
        new = runner_metadata(
            [1] * size, lens + [0] * pad, tables + [[0]] * pad, bs, "cuda", width, max_model_len
        )
        for name in ("seq_lens_tensor", "block_table", "slot_mapping"):
            getattr(capture, name).copy_(getattr(new, name))
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
        graph.replay()
        eager = backend.forward(q, k, v, cache.clone(), backend.build_metadata(new), scale)
        torch.testing.assert_close(out, eager, atol=0, rtol=0)  # same splits: same bits
        assert not out[len(lens) :].any()
        step = Step(q, k, v, cache, new, runner_metadata([1] * len(lens), lens, tables, bs, "cuda"))
        ref, _ = run_reference(step, scale)
        torch.testing.assert_close(out[: len(lens)].float(), ref, atol=2e-2, rtol=2e-2)
