"""Micro-benchmark of the Triton attention backend on the GPU (decode split-K and varlen prefill).

Legend: `T` tokens, `S` sequences, `Hq`/`Hkv` heads, `D` head size, `L` context length.

Decode figures are GB/s of KV read against the HBM bound; prefill figures are TFLOP/s (causal:
4 * Hq * D * sum of keys per query) against the bf16 tensor-core bound and, when available,
FlashAttention-2 on the same shape. Each figure is one backend forward (cache write included),
timed per layer over enough layer caches that the KV never sits in L2, median of
`triton.testing.do_bench` (eager) and `do_bench_cudagraph` (the production decode path).

Usage: python scripts/bench_attention.py [--sweep] [--save-result] [--hbm-gbps X --tflops Y]
`--sweep` times every candidate kernel config (the knobs in triton_kernels.py) and prints the
best per case instead; `--save-result` writes the figures' JSON into bench/results/.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twinfer.bench.results import add_result_args  # noqa: E402
from twinfer.layers.attention import CommonAttentionMetadata  # noqa: E402
from twinfer.layers.attention import triton_kernels as tk  # noqa: E402
from twinfer.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402

HQ, HKV, D, BLOCK_SIZE, DTYPE = 32, 4, 128, 16, torch.bfloat16
L2_FLUSH_BYTES = 256 * 2**20  # KV touched per timed call, so every layer reads from HBM
MAX_LAYERS = 64


def bounds(name: str) -> tuple[float, float]:
    """(HBM GB/s, dense bf16 TFLOP/s) of known GPUs."""
    if "H200" in name:
        return 4800.0, 989.0
    if "H100" in name:
        return (2000.0, 756.0) if "PCIe" in name else (3350.0, 989.0)
    if "A100" in name:
        return 2039.0, 312.0
    return 3350.0, 989.0


class Case:
    """One attention step over `layers` KV caches, each `[2, NB, bs, Hkv, D]`."""

    def __init__(self, contexts: list[int], query_lens: list[int], max_seq_len: int = 0) -> None:
        dev = torch.device("cuda")
        rng = random.Random(0)
        seq_lens = [c + q for c, q in zip(contexts, query_lens, strict=True)]
        need = [triton.cdiv(n, BLOCK_SIZE) for n in seq_lens]
        free = list(range(sum(need)))
        rng.shuffle(free)  # scattered blocks, as a long-running server has them
        tables = [[free.pop() for _ in range(n)] for n in need]
        table = torch.zeros(len(seq_lens), max(need), dtype=torch.long)
        for i, row in enumerate(tables):
            table[i, : len(row)] = torch.tensor(row)
        slots, qsl = [], [0]
        for row, c, n in zip(tables, contexts, seq_lens, strict=True):
            slots += [row[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(c, n)]
            qsl.append(qsl[-1] + n - c)
        self.common = CommonAttentionMetadata(
            query_start_loc=qsl,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_table=table.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_size=BLOCK_SIZE,
            query_start_loc_tensor=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_seq_len=max_seq_len,
        )
        t = qsl[-1]
        self.q = torch.randn(t, HQ, D, device=dev, dtype=DTYPE)
        self.k = torch.randn(t, HKV, D, device=dev, dtype=DTYPE)
        self.v = torch.randn(t, HKV, D, device=dev, dtype=DTYPE)
        self.kv_bytes = sum(seq_lens) * 2 * HKV * D * self.q.element_size()
        keys = sum(sum(range(c + 1, n + 1)) for c, n in zip(contexts, seq_lens, strict=True))
        self.flops = 4 * HQ * D * keys  # causal: query p sees keys 0..p
        cache_bytes = sum(need) * BLOCK_SIZE * 2 * HKV * D * self.q.element_size()
        self.layers = max(1, min(MAX_LAYERS, math.ceil(L2_FLUSH_BYTES / cache_bytes)))
        shape = (2, sum(need), BLOCK_SIZE, HKV, D)
        self.caches = [torch.randn(shape, device=dev, dtype=DTYPE) for _ in range(self.layers)]
        self.backend = TritonAttentionBackend()

    def run(self) -> None:
        md = self.backend.build_metadata(self.common)
        for cache in self.caches:
            self.backend.forward(self.q, self.k, self.v, cache, md, D**-0.5)

    def time_us(self, graph: bool) -> float:
        """Median µs per layer."""
        bench = triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench
        return bench(self.run, return_mode="median") * 1e3 / self.layers


def flash_baseline_us(n: int) -> tuple[str, float] | None:
    """FlashAttention-2 (or PyTorch's flash SDPA) on a fresh causal prompt of n tokens."""
    q = torch.randn(n, HQ, D, device="cuda", dtype=DTYPE)
    k = torch.randn(n, HKV, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    try:
        from flash_attn import flash_attn_varlen_func

        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        fn = lambda: flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True)
        name = "flash_attn"
    except ImportError:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = HQ // HKV
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
        kt, vt = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)

        def fn() -> None:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        name = "torch_flash_sdpa"
    try:
        return name, triton.testing.do_bench(fn, return_mode="median") * 1e3
    except RuntimeError:
        return None


DECODE_CASES = [(bs, ctx) for bs in (1, 8, 64) for ctx in (1024, 4096, 16384)]
PREFILL_CASES = [(512, 0), (2048, 0), (2048, 8192)]  # (new tokens, cached prefix)


def decode_case(bs: int, ctx: int) -> Case:
    return Case([ctx - 1] * bs, [1] * bs)


def prefill_case(n: int, prefix: int) -> Case:
    return Case([prefix], [n])


def report(args, hbm: float, tflops: float) -> None:
    from twinfer.bench.results import results_dir, write_result

    out_dir = results_dir(args)
    config = {"Hq": HQ, "Hkv": HKV, "D": D, "block_size": BLOCK_SIZE, "dtype": "bf16"}
    for bs, ctx in DECODE_CASES:
        case = decode_case(bs, ctx)
        eager, graph = case.time_us(False), case.time_us(True)
        gbps = case.kv_bytes / graph / 1e3
        line = f"decode bs={bs:<3} ctx={ctx:<6} graph {graph:8.1f} us  eager {eager:8.1f} us  "
        print(line + f"{gbps:7.0f} GB/s ({gbps / hbm:.0%} of {hbm:.0f})")
        name = f"triton_attn_decode_bs{bs}_ctx{ctx // 1024}k_bf16"
        cfg = {**config, "batch": bs, "context": ctx, "layers_timed": case.layers}
        write_result(out_dir, name, gbps, "GB/s", hbm, cfg, us_graph=graph, us_eager=eager)
    for n, prefix in PREFILL_CASES:
        case = prefill_case(n, prefix)
        us = case.time_us(False)
        tf = case.flops / us / 1e6
        base = flash_baseline_us(n) if prefix == 0 else None
        extra = f"  {base[0]} {base[1]:8.1f} us (triton takes {us / base[1]:.2f}x)" if base else ""
        print(f"prefill n={n:<5} prefix={prefix:<5} {us:8.1f} us {tf:6.0f} TFLOP/s{extra}")
        name = f"triton_attn_prefill_{n}_prefix{prefix}_bf16"
        cfg = {**config, "tokens": n, "prefix": prefix}
        more = {"us": us} | ({f"{base[0]}_us": base[1]} if base else {})
        write_result(out_dir, name, tf, "TFLOP/s", tflops, cfg, **more)


def _try(case: Case, graph: bool, *knobs: int) -> tuple | None:
    try:
        return (case.time_us(graph), *knobs)
    except Exception as exc:  # out of shared memory or registers: not a candidate
        print(f"  skip {knobs}: {type(exc).__name__}: {str(exc)[:80]}")
        return None


def sweep() -> None:
    """Time every candidate config per case; the printed best goes into triton_kernels.py."""
    key = (128, True)
    decode_default, waves_default = tk.DECODE_CONFIGS[key], tk.SPLIT_WAVES
    for bs, ctx in DECODE_CASES:
        case, results = decode_case(bs, ctx), []
        # Kernel config at the default waves, then the waves (splits) with the best config.
        for bn, warps, stages in itertools.product((16, 32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
            tk.DECODE_CONFIGS[key] = tk.KernelConfig(16, bn, warps, stages)
            results.append(_try(case, True, bn, warps, stages, waves_default))
        results = sorted(r for r in results if r)
        _, bn, warps, stages, _ = results[0]
        tk.DECODE_CONFIGS[key] = tk.KernelConfig(16, bn, warps, stages)
        for waves in (1, 4, 8):
            tk.SPLIT_WAVES = waves
            results.append(_try(case, True, bn, warps, stages, waves))
        tk.SPLIT_WAVES = waves_default
        results = sorted(r for r in results if r)
        best = ", ".join(f"{r[0]:.1f}us n{r[1]} w{r[2]} s{r[3]} waves{r[4]}" for r in results[:3])
        print(f"decode bs={bs} ctx={ctx}: {best}")
    tk.DECODE_CONFIGS[key] = decode_default
    prefill_default = tk.PREFILL_CONFIGS[key]
    for n, prefix in PREFILL_CASES:
        case, results = prefill_case(n, prefix), []
        for bm, bn, warps, stages in itertools.product(
            (64, 128, 256), (32, 64, 128), (4, 8), (1, 2, 3, 4)
        ):
            tk.PREFILL_CONFIGS[key] = tk.KernelConfig(bm, bn, warps, stages)
            results.append(_try(case, False, bm, bn, warps, stages))
        results = [r for r in results if r]
        results.sort()
        best = ", ".join(f"{us:.1f}us m{bm} n{bn} w{w} s{s}" for us, bm, bn, w, s in results[:3])
        print(f"prefill n={n} prefix={prefix}: {best}")
    tk.PREFILL_CONFIGS[key] = prefill_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="time every candidate config")
    add_result_args(parser)
    parser.add_argument("--hbm-gbps", type=float, help="HBM bound (default: by GPU name)")
    parser.add_argument("--tflops", type=float, help="bf16 dense bound (default: by GPU name)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    hbm, tflops = bounds(name)
    hbm, tflops = args.hbm_gbps or hbm, args.tflops or tflops
    print(f"{name}: Hq={HQ} Hkv={HKV} D={D} bf16 block_size={BLOCK_SIZE}, {torch.__version__}, "
          f"triton {triton.__version__}")  # fmt: skip
    if args.sweep:
        sweep()
    else:
        report(args, hbm, tflops)


if __name__ == "__main__":
    main()
