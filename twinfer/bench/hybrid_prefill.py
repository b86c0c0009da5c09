"""`twinfer bench hybrid-prefill`: long prompts with every routed expert in host RAM, streamed to
the GPU layer by layer (hybrid/gpu_prefill.py), each figure next to its PCIe bound.

Figures (DESIGN.md's benchmark model as in `bench hybrid`; bf16 dense part on the GPU):
- `hybrid_prefill_stream_4096_int4`, `hybrid_prefill_stream_4096_bf16`: prompt tokens/s to the
  first token of a 4096-token prompt (one chunk). Bound: every host expert byte crosses PCIe once
  per chunk: 4096 x pinned H2D GB/s (measured in the same run) / host expert bytes. Target for
  int4: 0.40 of the bound.
- `hybrid_ttft_32k_int4`: seconds to the first token of a 32768-token prompt (chunks of
  --chunk tokens). Bound (lower is better): the larger of the chunks' copies at the PCIe speed and
  the prefill's FLOPs at the GPU's measured bf16 matmul rate.
- `hybrid_itl_during_prefill`: mean inter-token latency of a running decode while a 32K prompt
  prefills, against the same decode alone (the bound); target: at most 2x.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from twinfer.bench.gpu import BENCH_SHAPE, _bench_model, add_common_args
from twinfer.bench.results import results_dir, write_result

STREAM_TARGET = 0.40  # hybrid_prefill_stream_4096_int4: this share of the PCIe bound
ITL_TARGET = 2.0  # hybrid_itl_during_prefill: at most this many times the solo ITL


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser, input_len=64, output_len=64, concurrency=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU expert threads.")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size.")
    parser.add_argument("--dtypes", default="int4,bf16", help="Host expert formats, in order.")
    parser.add_argument("--prefill-len", type=int, default=4096, help="Streamed prompt tokens.")
    parser.add_argument("--long-len", type=int, default=32768, help="TTFT / ITL prompt tokens.")
    parser.add_argument("--chunk", type=int, default=8192, help="--max-num-batched-tokens.")
    parser.add_argument("--window", type=int, default=2, help="--gpu-prefetch-window.")
    parser.add_argument(
        "--min-tokens", type=int, default=None, help="--gpu-prefill-min-tokens (default: auto)."
    )


def _build(args: argparse.Namespace, model: str, load_format: str, dtype: str) -> Any:
    from twinfer import LLM

    return LLM(
        model, dtype="bfloat16", load_format=load_format, device="cuda", cpu_moe=True,
        moe_cpu_dtype=dtype, moe_cpu_group_size=args.group_size, moe_cpu_threads=args.threads,
        max_model_len=args.long_len + 256, max_num_seqs=4, max_num_batched_tokens=args.chunk,
        gpu_prefill_min_tokens=args.min_tokens, gpu_prefetch_window=args.window,
        enforce_eager=args.enforce_eager, enable_prefix_caching=False,
    )  # fmt: skip


def _ttft(llm: Any, prompt: list[int]) -> float:
    from twinfer import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    return time.perf_counter() - t


def _prompt(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(100, vocab, size=n).tolist()


def itl_during_prefill(llm: Any, rng: np.random.Generator, long_len: int, vocab: int) -> dict:
    """A decode runs alone for 64 tokens, then beside a `long_len`-token prompt until that
    prompt's first token: the decode's inter-token gaps in both windows."""
    from twinfer import SamplingParams

    engine = llm.engine
    decode = SamplingParams(temperature=0.0, max_tokens=100000, ignore_eos=True, detokenize=False)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    engine.add_request("decode", _prompt(rng, 64, vocab), decode)
    stamps: list[float] = []

    def step() -> list[Any]:
        outs = engine.step()
        if any(o.request_id == "decode" for o in outs):
            stamps.append(time.perf_counter())
        return outs

    while len(stamps) < 16 + 64:  # 16 to warm up, 64 timed
        step()
    solo = np.diff(stamps[16:]) * 1e3
    stamps.clear()
    t0 = time.perf_counter()
    engine.add_request("long", _prompt(rng, long_len, vocab), first)
    ttft = None
    while ttft is None:
        if any(o.request_id == "long" and o.finished for o in step()):
            ttft = time.perf_counter() - t0
    during = np.diff([t0, *stamps]) * 1e3
    engine.abort_request("decode")
    while engine.has_unfinished_requests():
        engine.step()
    return {
        "solo_ms": float(solo.mean()),
        "solo_p99_ms": float(np.percentile(solo, 99)),
        "during_ms": float(during.mean()),
        "during_p50_ms": float(np.median(during)),
        "during_p99_ms": float(np.percentile(during, 99)),
        "during_max_ms": float(during.max()),
        "decode_tokens_during": len(stamps),
        "ttft_s": ttft,
        "background_chunks": engine.core.runner.background_chunks,
    }


def main(args: argparse.Namespace) -> int:
    import torch

    from twinfer.native import native_engine, native_error

    if native_engine is None:
        print(f"error: bench hybrid-prefill streams the native engine's experts: {native_error}")
        return 2
    if not torch.cuda.is_available():
        print("error: bench hybrid-prefill streams host experts to a GPU; this machine has none.")
        return 2
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if bad := [d for d in args.dtypes if d not in ("bf16", "int8", "int4")]:
        print(f"error: --dtypes {','.join(bad)}: the host expert formats are bf16, int8, int4.")
        return 2
    from twinfer.bench.check import measure_bf16_tflops, measure_pcie_gbps

    torch.cuda.init()
    h2d, _ = measure_pcie_gbps()
    tflops = measure_bf16_tflops()
    print(f"machine: pinned PCIe H2D {h2d:.1f} GB/s, GPU bf16 matmul {tflops:.0f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = _bench_model(args, Path(tmp))
        results = []
        for dtype in args.dtypes:
            results += _figures(args, model, load_format, dtype, h2d, tflops)
            gc.collect()
            torch.cuda.empty_cache()
    print("summary (ratio = value / bound):")
    for r in results:
        target = "-" if r["target"] is None else f"{r['target_sign']} {r['target']:g}"
        print(f"  {r['benchmark']:<34}{r['value']:>10.3f} {r['unit']:<9} bound "
              f"{r['bound']:>9.3f}  ratio {r['ratio']:.3f}  target {target}")  # fmt: skip
    return 0


def _figures(
    args: argparse.Namespace, model: str, load_format: str, dtype: str, h2d: float, tflops: float
) -> list[dict[str, Any]]:
    from twinfer.bench.model_cost import ModelCost

    llm = _build(args, model, load_format, dtype)
    runner = llm.engine.runner
    streamer = runner.streamer
    plan = llm.engine.info.moe_plan
    host_bytes = plan.bytes_at("host")
    vocab = llm.engine.info.vocab_size
    cost = ModelCost.from_pretrained(model, "bfloat16")
    rng = np.random.default_rng(0)
    s = plan.shapes[0]
    config = {
        "model": BENCH_SHAPE if args.model is None else args.model, "num_layers": cost.num_layers,
        "hidden": s.hidden, "num_experts": s.num_experts, "top_k": s.top_k,
        "expert_inner": s.inner, "weight_dtype": "bfloat16",
        "placement": "all routed experts in host RAM", "dtype": dtype,
        "group_size": args.group_size if dtype == "int4" else None,
        "threads": plan.workers.num_threads, "chunk": args.chunk, "window": args.window,
        "min_tokens": None if streamer is None else streamer.min_tokens,
        "cuda_graphs": runner.graphs is not None,
    }  # fmt: skip
    stream_info = {
        "h2d_gbps": round(h2d, 2),
        "host_expert_bytes": host_bytes,
        "cost_model": None if streamer is None else streamer.cost.describe(streamer.min_tokens, 0),
    }
    results = []
    n = args.prefill_len
    for _ in range(2):  # warm-up: kernels compiled, pages touched
        _ttft(llm, _prompt(rng, n, vocab))
    before = dict(streamer.stats) if streamer else {}
    times = [_ttft(llm, _prompt(rng, n, vocab)) for _ in range(5)]
    after = dict(streamer.stats) if streamer else {}
    per_run = {k: (after[k] - before[k]) / 5 for k in after}
    bound = n * h2d * 1e9 / (host_bytes * -(-n // args.chunk))
    results.append(
        write_result(
            results_dir(args), f"hybrid_prefill_stream_{n}_{dtype}", n / statistics.median(times),
            "tokens/s", bound, {**config, "input_len": n},
            bound_basis={**stream_info, "what": "host expert bytes over PCIe once per chunk"},
            target=STREAM_TARGET if dtype == "int4" else None, target_sign=">=",
            ttft_s=[round(t, 4) for t in times], streamed_per_prompt=per_run,
        )
    )  # fmt: skip
    if dtype == "int4":
        results += _long_prompt_figures(args, llm, rng, vocab, cost, config, stream_info, tflops)
    del llm, runner, streamer
    return results


def _long_prompt_figures(args, llm, rng, vocab, cost, config, stream_info, tflops) -> list:

    n = args.long_len
    chunks = -(-n // args.chunk)
    copy_s = chunks * stream_info["host_expert_bytes"] / (stream_info["h2d_gbps"] * 1e9)
    compute_s = cost.prefill_flops(n) / (tflops * 1e12)
    ttft = min(_ttft(llm, _prompt(rng, n, vocab)) for _ in range(2))
    results = [
        write_result(
            results_dir(args), f"hybrid_ttft_{n // 1024}k_int4", ttft, "s", max(copy_s, compute_s),
            {**config, "input_len": n},
            bound_basis={
                **stream_info, "chunks": chunks, "copy_s": round(copy_s, 4),
                "compute_s": round(compute_s, 4), "bf16_tflops": round(tflops, 1),
                "what": "max(chunks x host expert bytes / PCIe, prefill FLOPs / bf16 matmul rate)",
            },
            target=None, target_sign="<=", lower_is_better=True,
        )
    ]  # fmt: skip
    itl = itl_during_prefill(llm, rng, n, vocab)
    print(
        f"decode ITL alone {itl['solo_ms']:.2f} ms, during a {n}-token prefill "
        f"{itl['during_ms']:.2f} ms (p50 {itl['during_p50_ms']:.2f}, p99 "
        f"{itl['during_p99_ms']:.2f}, max {itl['during_max_ms']:.2f}); TTFT {itl['ttft_s']:.2f} s"
    )
    results.append(
        write_result(
            results_dir(args), "hybrid_itl_during_prefill", itl["during_ms"], "ms",
            itl["solo_ms"], {**config, "input_len": n, "decode_batch": 1},
            bound_basis={"what": "the same decode's mean ITL alone (64 tokens)"},
            target=ITL_TARGET, target_sign="<=", lower_is_better=True,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in itl.items()},
        )
    )  # fmt: skip
    return results
