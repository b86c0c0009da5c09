"""`twinfer bench load`: load time and peak host memory of the benchmark model from a block-FP8
checkpoint on disk, every routed expert kept as FP8 in host RAM (the hybrid placement).

Figure `load_fp8_peak_rss`: the peak resident memory the load adds (anonymous and mapped file
pages alike, `ru_maxrss` of a fresh process over its RSS before the load) per checkpoint byte;
bound 1.15 (lower is better): the experts once in host RAM, plus one shard at a time on its way.
Beside it: load seconds and checkpoint GB/s (from the page cache: the file was just written).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
from pathlib import Path
from typing import Any

from twinfer.bench.results import add_result_args, results_dir, write_result

RSS_BOUND = 1.15


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-layers", type=int, default=12, help="Layers of the model.")
    parser.add_argument("--shard-gb", type=float, default=0.5, help="Checkpoint shard size (GB).")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="Default: cuda if there is one.")
    parser.add_argument("--threads", type=int, default=16, help="CPU expert threads.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer (a dir or .gguf).")
    add_result_args(parser)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _measure(path: str, device: str, threads: int, queue: Any) -> None:
    """In a fresh process: load the checkpoint, report seconds and peak RSS growth."""
    import time

    import torch

    from twinfer import LLM

    if device == "cuda":  # the CUDA context is not the model's memory
        torch.ones(1, device="cuda")
    before = _rss()
    start = time.perf_counter()
    llm = LLM(
        path, dtype="bfloat16", device=device, cpu_moe=True, moe_cpu_threads=threads,
        max_model_len=256, enforce_eager=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = llm.engine.info.moe_plan
    queue.put(
        {
            "seconds": seconds,
            "peak_growth": peak - before,
            "rss_after": _rss() - before,
            "host_format": plan.host_format,
            "host_expert_bytes": plan.bytes_at("host"),
        }
    )


def main(args: argparse.Namespace) -> int:
    import torch

    from twinfer.bench.formats import write_fp8_checkpoint
    from twinfer.bench.gpu import BENCH_SHAPE
    from twinfer.bench.random_model import DEFAULT_TOKENIZER, make_random_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        base = make_random_checkpoint(
            BENCH_SHAPE, Path(tmp) / "base", num_layers=args.num_layers,
            tokenizer_from=args.tokenizer or DEFAULT_TOKENIZER, weights=False,
        )  # fmt: skip
        fp8 = Path(tmp) / "fp8"
        nbytes = write_fp8_checkpoint(base, fp8, int(args.shard_gb * 1e9))
        print(f"FP8 checkpoint: {nbytes / 1e9:.2f} GB in shards of {args.shard_gb:g} GB")
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_measure, args=(str(fp8), device, args.threads, queue))
        child.start()
        child.join()
        if child.exitcode != 0:
            print(f"error: the loading process failed (exit code {child.exitcode})")
            return 1
        m = queue.get()
    ratio = m["peak_growth"] / nbytes
    print(
        f"load: {m['seconds']:.1f} s ({nbytes / 1e9 / m['seconds']:.2f} GB/s); peak RSS +"
        f"{m['peak_growth'] / 1e9:.2f} GB = {ratio:.3f}x the checkpoint (bound {RSS_BOUND}); "
        f"experts in host RAM as {m['host_format']}: {m['host_expert_bytes'] / 1e9:.2f} GB"
    )
    config = {
        "model": BENCH_SHAPE, "num_layers": args.num_layers, "checkpoint": "block fp8 (128x128)",
        "checkpoint_bytes": nbytes, "shard_bytes": int(args.shard_gb * 1e9), "device": device,
        "placement": "all routed experts on the CPU", "moe_cpu_dtype": "keep",
    }  # fmt: skip
    write_result(
        results_dir(args), "load_fp8_peak_rss", ratio, "x", RSS_BOUND, config,
        bound_basis={"what": "peak RSS growth while loading / checkpoint bytes"},
        lower_is_better=True, target=RSS_BOUND, load_seconds=round(m["seconds"], 2),
        load_gbps=round(nbytes / 1e9 / m["seconds"], 3),
        rss_after_load=m["rss_after"], host_expert_bytes=m["host_expert_bytes"],
        host_format=m["host_format"],
    )  # fmt: skip
    return 0
