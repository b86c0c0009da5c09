"""Benchmark (and tune) the fused Triton MoE kernels on one GPU.

    python scripts/bench_fused_moe.py                  # the current MOE_CONFIGS, T = 1 .. 4096
    python scripts/bench_fused_moe.py --sweep          # search block sizes per T, print a table
    python scripts/bench_fused_moe.py --save-result    # also bench/results/fused_moe_*.json

Shape: the Qwen3-30B-A3B experts (E=128, K=8, H=2048, I=768, bf16), random weights and random
routing (a softmax over random logits). Every figure is per layer and replays from a CUDA graph
that runs `--layers` layers with their own weights, so the 8 experts of a decode step come from
HBM, not from the 50 MB L2 the way one layer replayed in a loop would.
Printed: time (µs), expert-weight bytes the step touches (distinct experts x bytes per expert)
/ time in GB/s, TFLOP/s, and the roofline ratio: max(bytes / HBM GB/s, FLOPs / bf16 TFLOP/s)
over the time, both bounds measured on this GPU (twinfer.bench.check).

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size, `S` = T*K slots.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
from collections.abc import Callable

import torch

from twinfer.bench.results import add_result_args, results_dir, write_result
from twinfer.layers.moe import triton_kernels as tk
from twinfer.layers.moe.triton_kernels import GemmConfig, MoEConfig, fused_moe, fused_topk

E, K, H, I = 128, 8, 2048, 768  # noqa: E741 (the legend's expert inner size)
BYTES_PER_EXPERT = 3 * H * I * 2  # w1 + w3 + w2 in bf16
DEVICE = "cuda"


def graph_us(fn: Callable[[int], object], layers: int, replays: int = 20) -> float:
    """Median µs per layer of a CUDA graph running fn(0) .. fn(layers - 1)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for layer in range(layers):
            fn(layer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            fn(layer)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    del graph
    return statistics.median(times)


class Problem:
    """`layers` layers of experts, one routed batch of T tokens per layer."""

    def __init__(self, t: int, layers: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        dev, bf16 = DEVICE, torch.bfloat16
        self.t = t
        self.w13 = [
            torch.randn(E, 2 * I, H, device=dev, dtype=bf16) / H**0.5 for _ in range(layers)
        ]
        self.w2 = [torch.randn(E, H, I, device=dev, dtype=bf16) / I**0.5 for _ in range(layers)]
        self.hidden = torch.randn(t, H, device=dev, dtype=bf16)
        routes = [fused_topk(torch.randn(t, E, device=dev), K, True) for _ in range(layers)]
        self.weights = [w for w, _ in routes]  # [T, K]
        self.ids = [ids for _, ids in routes]  # [T, K]
        self.experts = statistics.mean(len(ids.unique()) for ids in self.ids)  # distinct/layer

    def run(self, layer: int, config: MoEConfig | None = None) -> torch.Tensor:
        args = (self.weights[layer], self.ids[layer], self.w13[layer], self.w2[layer])
        return fused_moe(self.hidden, *args, config=config)


def report(p: Problem, us: float, hbm_gbps: float, tflops: float) -> dict[str, float]:
    nbytes = p.experts * BYTES_PER_EXPERT
    flops = 2 * p.t * K * 3 * H * I
    bound_us = max(nbytes / hbm_gbps / 1e3, flops / tflops / 1e6)
    row = {
        "us": us,
        "gbps": nbytes / us / 1e3,
        "tflops": flops / us / 1e6,
        "experts": p.experts,
        "bound_us": bound_us,
        "ratio": bound_us / us,
    }
    print(
        f"T={p.t:5d}  {us:9.1f} µs  experts {p.experts:6.1f}  {row['gbps']:7.0f} GB/s  "
        f"{row['tflops']:6.1f} TFLOP/s  bound {bound_us:8.1f} µs  ratio {row['ratio']:.2f}"
    )
    return row


def _fits(block_m: int, cfg: GemmConfig, gated: bool) -> bool:
    """Shared memory of the pipelined tiles (bf16) within the H100's 227 KB."""
    per_stage = 2 * (block_m * cfg.block_k + (2 if gated else 1) * cfg.block_k * cfg.block_n)
    return cfg.num_stages * per_stage <= 220 * 1024


def _grid(t: int, full: bool) -> list[GemmConfig]:
    """The configs tried per GEMM and block_m (compiles dominate: ~1 s each, shared across T)."""
    block_n = (16, 32, 64, 128, 256) if full else (32, 64, 128)
    block_k = (32, 64, 128, 256) if full else (64, 128, 256)
    warps = (2, 4, 8) if full else (4, 8)
    stages = (2, 3, 4, 5, 6) if full else (3, 4)
    group = (1, 4, 8, 16) if full else ((1,) if t <= 64 else (8,))
    return [GemmConfig(*c) for c in itertools.product(block_n, block_k, warps, stages, group)]


def _block_ms(t: int, full: bool) -> tuple[int, ...]:
    """block_m candidates around the mean slots per expert (a quarter to twice it)."""
    per_expert = t * K / E
    if full:
        return (16, 32, 64, 128)
    picked = tuple(m for m in (16, 32, 64, 128) if per_expert / 4 <= m <= 2 * per_expert)
    return picked or ((16,) if per_expert < 16 else (128,))


def gemm_us(p: Problem, aligns: list, block_m: int, cfg: GemmConfig, gated: bool, n: int) -> float:
    """µs of one GEMM alone (alignment and inputs prepared outside the graph)."""
    s = p.t * K
    act = torch.randn(s, I, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(s, I if gated else H, device=DEVICE, dtype=torch.bfloat16)

    def fn(layer: int) -> None:
        a, w = (p.hidden, p.w13[layer]) if gated else (act, p.w2[layer])
        weights = p.weights[layer].reshape(-1)
        tk._launch_gemm(a, w, out, weights, aligns[layer], s, gated, K, block_m, cfg)

    return graph_us(fn, n)


def sweep(p: Problem, layers: int, full: bool) -> MoEConfig:
    """Per block_m, the best gate+up and the best down config timed on their own; then the best
    block_m by the whole fused_moe (alignment and the sum over K included)."""
    best: tuple[float, MoEConfig] | None = None
    for block_m in _block_ms(p.t, full):
        aligns = [tk.moe_align_block_size(ids, block_m, E) for ids in p.ids]
        picks = []
        for gated in (True, False):
            timed = []
            for cfg in _grid(p.t, full):
                if not _fits(block_m, cfg, gated):
                    continue
                try:
                    timed.append((gemm_us(p, aligns, block_m, cfg, gated, layers), cfg))
                except Exception as exc:  # out of resources and the like: skip the config
                    print(f"  skip {cfg}: {type(exc).__name__}")
            timed.sort(key=lambda x: x[0])
            for us, cfg in timed[:3]:
                print(f"  block_m {block_m:3d} {'up  ' if gated else 'down'} {us:8.1f} µs  {cfg}")
            picks.append(timed[0][1])
        config = MoEConfig(block_m, *picks)
        us = graph_us(functools.partial(p.run, config=config), layers)
        print(f"  block_m {block_m:3d} fused_moe {us:8.1f} µs")
        if best is None or us < best[0]:
            best = (us, config)
    assert best is not None
    return best[1]


def _table(configs: dict[int, MoEConfig]) -> str:
    def g(c: GemmConfig) -> str:
        return f"GemmConfig({c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages}, {c.group_m})"

    rows = [f"    {t}: MoEConfig({c.block_m}, {g(c.up)}, {g(c.down)})," for t, c in configs.items()]
    last = configs[max(configs)]
    rows.append(f"    1 << 30: MoEConfig({last.block_m}, {g(last.up)}, {g(last.down)}),")
    return "MOE_CONFIGS: dict[int, MoEConfig] = {\n" + "\n".join(rows) + "\n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    parser.add_argument("--layers", type=int, default=8, help="Weight copies (defeat the L2).")
    parser.add_argument("--sweep", action="store_true", help="Search configs per T.")
    parser.add_argument("--full", action="store_true", help="A much larger sweep grid.")
    add_result_args(parser)
    args = parser.parse_args()

    from twinfer.bench.check import measure_bf16_tflops, measure_hbm_gbps

    hbm, tflops = measure_hbm_gbps(), measure_bf16_tflops()
    print(f"{torch.cuda.get_device_name()}: HBM {hbm:.0f} GB/s, bf16 {tflops:.0f} TFLOP/s")
    tuned: dict[int, MoEConfig] = {}
    for t in args.tokens:
        p = Problem(t, args.layers)
        if args.sweep:
            tuned[t] = sweep(p, args.layers, args.full)
            print(f"T={t}: best {tuned[t]}")
        config = tuned.get(t) or tk.get_moe_config(t, K, E)
        row = report(p, graph_us(functools.partial(p.run, config=config), args.layers), hbm, tflops)
        if (out_dir := results_dir(args)) is not None:
            write_result(
                out_dir,
                f"fused_moe_t{t}_bf16",
                p.t / row["us"] * 1e6,
                "tokens/s",
                p.t / row["bound_us"] * 1e6,
                {"E": E, "K": K, "H": H, "I": I, "dtype": "bf16", "T": t, "moe": str(config)},
                time_us=round(row["us"], 2),
                expert_gbps=round(row["gbps"], 1),
                tflops=round(row["tflops"], 2),
                hbm_gbps=round(hbm, 1),
                bf16_tflops=round(tflops, 1),
            )
        del p
        torch.cuda.empty_cache()
    if tuned:
        print("\n# Paste into twinfer/layers/moe/triton_kernels.py:")
        print(_table(tuned))


if __name__ == "__main__":
    main()
