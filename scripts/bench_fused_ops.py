#!/usr/bin/env python
"""Fused Triton ops against the torch-op chains they replace, on one GPU, in bf16.

Each figure is a CUDA graph of 100 back-to-back calls replayed and divided by 100, so kernel launch
gaps inside a graph (what a decode step pays per kernel) are in it, Python overhead is not.
Shapes are the Qwen3-30B-A3B benchmark model's: H 2048, 32 q / 4 kv heads, D 128; the SiLU-mul
rows are tokens x top-8 experts of inner size 768 (as [T, 8 * 768]).
The bound is the op's DRAM traffic at the GPU's HBM rate; at small T launch latency dominates.

Usage: python scripts/bench_fused_ops.py [--tokens 1 64 2048] [--hbm-gbps 3350] [--save]
Shapes: `T` tokens, `H` hidden, `D` head size, `nq` / `nkv` q / kv heads, `I` inner size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twinfer.layers import fused_ops  # noqa: E402
from twinfer.layers.activation import silu_and_mul  # noqa: E402
from twinfer.layers.norm import RMSNorm  # noqa: E402
from twinfer.layers.rotary import RotaryEmbedding  # noqa: E402

H, NQ, NKV, D, INNER, MAX_POS, EPS = 2048, 32, 4, 128, 8 * 768, 40960, 1e-6
CALLS = 100
# NOTE: datasheet HBM rates in GB/s; the first name that is a substring of the device name wins.
HBM_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}


def graph_us(fn: Callable[[], object], reps: int = 20) -> float:
    """Median µs per call of `fn` over replays of one CUDA graph holding CALLS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile / autotune outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    del graph
    return statistics.median(times)


def cases(t: int) -> list[tuple[str, Callable[[], object], Callable[[], object], int]]:
    """(name, torch chain, fused op, DRAM bytes) for T tokens."""
    dt, dev = torch.bfloat16, "cuda"
    norm = RMSNorm(H, EPS).to(dev, dt)
    q_norm, k_norm = RMSNorm(D, EPS).to(dev, dt), RMSNorm(D, EPS).to(dev, dt)
    for module in (norm, q_norm, k_norm):  # parameters are torch.empty until a loader fills them
        module.weight.fill_(1.0)
    rot = RotaryEmbedding(D, MAX_POS, {"rope_type": "default", "rope_theta": 1e6}).to(dev)
    x = torch.randn(t, H, device=dev, dtype=dt)  # [T, H]
    residual = torch.randn(t, H, device=dev, dtype=dt)
    qkv = torch.randn(t, (NQ + 2 * NKV) * D, device=dev, dtype=dt)  # [T, (nq + 2 nkv) D]
    q, k, _ = qkv.split([NQ * D, NKV * D, NKV * D], dim=-1)
    positions = torch.randint(0, MAX_POS, (t,), device=dev)
    gate_up = torch.randn(t, 2 * INNER, device=dev, dtype=dt)  # [T, 2I]
    cache = rot.cos_sin_cache

    def torch_qk_norm_rope() -> object:  # LlamaAttention.forward's Qwen3 prologue
        qn = q_norm(q.reshape(t, -1, D)).reshape(t, -1)
        kn = k_norm(k.reshape(t, -1, D)).reshape(t, -1)
        return rot(positions, qn, kn)

    # DRAM bytes: bf16 rows read and written (weights are noise), plus the float32 cos/sin rows.
    norm_bytes, rope_bytes = 2 * t * H * 2, 2 * t * (NQ + NKV) * D * 2 + t * D * 4
    return [
        ("rms_norm", lambda: norm(x), lambda: fused_ops.rms_norm(x, norm.weight, EPS), norm_bytes),
        (
            "fused_add_rms_norm",
            lambda: norm(x, residual),
            lambda: fused_ops.fused_add_rms_norm(x, residual, norm.weight, EPS),
            2 * norm_bytes,
        ),
        (
            "rope",
            lambda: rot(positions, q, k),
            lambda: fused_ops.rotary_embedding(positions, q, k, cache, D),
            rope_bytes,
        ),
        (
            "qk_norm_rope",
            torch_qk_norm_rope,
            lambda: fused_ops.rotary_embedding(
                positions, q, k, cache, D, q_norm.weight, k_norm.weight, EPS
            ),
            rope_bytes,
        ),
        (
            "silu_and_mul",
            lambda: silu_and_mul(gate_up),
            lambda: fused_ops.silu_and_mul(gate_up),
            t * 3 * INNER * 2,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 2048])
    parser.add_argument("--hbm-gbps", type=float, default=None, help="HBM GB/s for the bound")
    parser.add_argument("--save", action="store_true", help="write bench/results/*.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_ops needs a CUDA GPU.")
    name = torch.cuda.get_device_name()
    gbps = args.hbm_gbps or next((v for k, v in HBM_GBPS.items() if k in name), None)
    if gbps is None:
        raise SystemExit(f"unknown HBM rate for {name!r}; pass --hbm-gbps.")
    print(f"{name}, HBM {gbps:.0f} GB/s, bf16, {CALLS} calls per graph replay")
    print(
        "NOTE: the torch rope gathers cos/sin once per positions tensor (once a step in a model),"
    )
    print(
        "      so here that gather is amortized over all calls: the torch figures are optimistic."
    )
    print(f"{'op':<20}{'T':>6}{'torch us':>11}{'fused us':>11}{'speedup':>9}{'bound us':>10}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for t in args.tokens:
            for op, torch_fn, fused_fn, nbytes in cases(t):
                torch_us, fused_us = graph_us(torch_fn), graph_us(fused_fn)
                bound_us = nbytes / (gbps * 1e3)
                print(
                    f"{op:<20}{t:>6}{torch_us:>11.2f}{fused_us:>11.2f}"
                    f"{torch_us / fused_us:>8.2f}x{bound_us:>10.2f}"
                )
                if args.save:
                    from twinfer.bench.results import write_result

                    config = {"tokens": t, "hidden": H, "num_heads": NQ, "num_kv_heads": NKV}
                    config |= {"head_dim": D, "inner": INNER, "dtype": "bfloat16"}
                    write_result(
                        Path("bench/results"), f"fused_{op}_t{t}_bf16", fused_us, "us",
                        bound_us, config, torch_us=round(torch_us, 3), bytes=nbytes,
                    )  # fmt: skip
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
