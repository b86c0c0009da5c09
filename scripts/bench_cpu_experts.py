"""The CPU expert engine alone: decode-shaped layer calls against the pool's own read bandwidth.

Builds `--layers` host expert layers of the benchmark shape (H 2048, I 768, E 128, top-8) straight
on the native engine (one random expert packed E times: the bytes are distinct, the values need
not be), then times synchronous calls layer after layer with distinct random experts, so every
call reads from DRAM. Prints GB/s of expert bytes read next to the pool's read-sum GB/s.

  python scripts/bench_cpu_experts.py --threads 14,16 --formats bf16,int4 --tokens 1,8
  TWINFER_PREFETCH_BYTES=4096 python scripts/bench_cpu_experts.py   # a prefetch distance
"""

from __future__ import annotations

import argparse
import time

import torch

from twinfer.hybrid.cpu_experts import thread_pool
from twinfer.hybrid.numa import CpuTopology, plan_workers
from twinfer.native import native_engine, native_error


def run(threads: int, fmt: str, tokens: list[int], args: argparse.Namespace) -> None:
    h, i, e, k = args.hidden, args.inner, args.experts, args.top_k
    workers = plan_workers(CpuTopology.detect(), threads, args.binding)
    pool = thread_pool(workers, args.spin_us)
    engine = native_engine.MoEEngine(pool)
    w13 = torch.randn(2 * i, h, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(h, i, dtype=torch.bfloat16) * 0.02
    layers = []
    for _ in range(args.layers):
        layer = native_engine.ExpertLayer(
            pool, e, h, i, fmt, args.group_size if fmt == "int4" else 0
        )
        layer.load_experts(list(range(e)), [w13.data_ptr()] * e, [w2.data_ptr()] * e, "bf16")
        layers.append((engine.add_layer(layer), layer))
    per_expert = layers[0][1].bytes // e
    read = native_engine.measure_read_bandwidth(pool, 2**30, 5)
    for t in tokens:
        hidden = torch.randn(t, h, dtype=torch.bfloat16)
        out = torch.empty_like(hidden)
        weights = torch.full((t, k), 1.0 / k, dtype=torch.float32)
        calls = []
        for _ in range(args.iters):
            ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32)
            calls.append((ids, len(set(ids.flatten().tolist()))))

        def sweep(n: int, hidden=hidden, out=out, weights=weights, calls=calls, t=t) -> int:
            moved = 0
            for j in range(n):
                ids, distinct = calls[j % len(calls)]
                lid, _ = layers[j % len(layers)]
                engine.forward(
                    lid, hidden.data_ptr(), "bf16", ids.data_ptr(), "int32",
                    weights.data_ptr(), "f32", out.data_ptr(), t, k,
                )  # fmt: skip
                moved += distinct * per_expert
            return moved

        sweep(len(layers))  # warm-up
        start = time.perf_counter()
        moved = sweep(args.iters)
        seconds = time.perf_counter() - start
        gbps = moved / seconds / 1e9
        print(
            f"threads {threads:2d} {fmt:5s} T={t:<3d} {gbps:6.1f} GB/s of experts, "
            f"{seconds / args.iters * 1e3:6.3f} ms/layer call, read-sum {read:6.1f} GB/s, "
            f"ratio {gbps / read:.3f}, isa {engine.isa}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="", help="Comma list (default: all physical cores).")
    p.add_argument("--formats", default="bf16,int4")
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--iters", type=int, default=240)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inner", type=int, default=768)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--binding", default="core", choices=("core", "numa"))
    p.add_argument("--spin-us", type=int, default=2000)
    args = p.parse_args()
    if native_engine is None:
        raise SystemExit(native_error)
    cores = CpuTopology.detect().physical_cores
    threads = [int(x) for x in args.threads.split(",")] if args.threads else [cores]
    tokens = [int(x) for x in args.tokens.split(",")]
    for fmt in args.formats.split(","):
        for n in threads:
            run(n, fmt, tokens, args)


if __name__ == "__main__":
    main()
