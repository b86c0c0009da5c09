"""`twinfer bench hybrid`: every routed expert in host RAM on the native CPU expert engine, the
rest on the GPU, each figure next to its DRAM bound.

Figures (DESIGN.md's benchmark model as in `bench gpu`; bf16 dense part, 16 expert threads):
- `hybrid_decode_bs1_bf16`, `hybrid_decode_bs1_int4`: decode tokens/s of one sequence; bound:
  measured DRAM read GB/s over the host-expert bytes a token reads (top-k packed experts of every
  layer, int4 with its scales). Targets: 0.85 and 0.70 of the bound.
- `hybrid_decode_bs1_fp8`, `hybrid_decode_bs1_ct_int4`: the same from a block-FP8 checkpoint and a
  compressed-tensors INT4 g32 one of the model's shape (bench/formats.py; random weights), experts
  kept in the checkpoint's format (--moe-cpu-dtype keep). Targets: 0.75 of the bound; ct_int4 at
  least the int4 figure.
- `hybrid_decode_c8_int4`: aggregate decode tokens/s of 8 sequences; bound: DRAM GB/s over the
  bytes of the distinct experts 8 tokens touch (uniform routing: ~52 of 128 per layer at top-8);
  beside it the speedup over batch 1 of the same run (target 3x).
- `cpu_expert_kernel_bw`: the engine alone (bf16, batch 1, layer after layer): expert bytes read
  per second over the DRAM GB/s (target 0.85).
- `hybrid_host_ram`: host RAM the LLM adds over the expert bytes placed there (bound 1.1, lower
  is better), the worse of the dtypes run.
With --profile, the bs1 records say where a step's milliseconds go (CPU experts, GPU, the rest).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from twinfer.bench.gpu import BENCH_SHAPE, _bench_model, _decode_rate, _profile, add_common_args
from twinfer.bench.results import results_dir, write_result

# Targets on the ratio (value / bound) of each figure, from the issue.
TARGETS = {
    "hybrid_decode_bs1_bf16": 0.85, "hybrid_decode_bs1_int4": 0.70, "cpu_expert_kernel_bw": 0.85,
    "hybrid_decode_bs1_fp8": 0.75,
}  # fmt: skip
# --dtypes naming a checkpoint format (bench/formats.py): the model is that checkpoint, kept.
CHECKPOINT_DTYPES = ("fp8", "ct_int4")
BATCH_SPEEDUP = 3.0  # hybrid_decode_c8_int4's target: this many times batch 1
HOST_RAM_BOUND = 1.1  # host RAM in use per byte of experts placed there
_KERNEL_SECONDS = 1.0  # per dtype: ~100 passes over all host layers on the benchmark model


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser, input_len=64, output_len=64, concurrency=8)
    parser.add_argument("--threads", type=int, default=16, help="CPU expert threads.")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size.")
    parser.add_argument(
        "--dtypes",
        default="bf16,int4",
        help="Host expert formats, in order: bf16, int8, int4 (from the bf16 model), or fp8, "
        "ct_int4 (the model as a block-FP8 / compressed-tensors INT4 g32 checkpoint, kept).",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), help="Default: cuda if there is one.")
    parser.add_argument(
        "--dram-gbps", type=float, default=None, help="DRAM read GB/s (default: measure)."
    )


def rss_anon() -> int:
    """This process's anonymous resident bytes (heap, mmap'd buffers; not file pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _host_layers(llm: Any) -> list[Any]:
    from twinfer.layers.moe import MoELayer

    model = llm.engine.runner.model
    return [m for m in model.modules() if isinstance(m, MoELayer) and m.host_experts is not None]


def kernel_gbps(llm: Any, seconds: float | None = None) -> float:
    """Expert bytes/s of the CPU engine alone: batch 1, K distinct random experts per call, one
    host layer after another (a pass reads far more than the L3, so nothing stays cached)."""
    import torch

    seconds = _KERNEL_SECONDS if seconds is None else seconds
    layers = _host_layers(llm)
    engine = llm.engine.runner.cpu_experts.engine  # the native MoEEngine: no torch in the loop
    k, e, h = layers[0].top_k, layers[0].num_experts, layers[0].hidden_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(997)]).int()  # [N, K]
    hidden = torch.randn(1, h, generator=gen).to(torch.bfloat16)  # [1, H]
    weights, out = torch.full((1, k), 1 / k), torch.empty_like(hidden)  # [1, K] f32, [1, H]
    ptrs = [row.data_ptr() for row in ids]
    hid, w, out_ptr, id_dtype = hidden.data_ptr(), weights.data_ptr(), out.data_ptr(), "int32"
    calls = [m.host_experts.layer_id for m in layers]
    per_pass = sum(k * m.host_experts.nbytes / e for m in layers)

    def one_pass(i: int) -> float:
        for j, layer_id in enumerate(calls):
            row = ptrs[(i * len(calls) + j) % len(ptrs)]
            engine.forward(layer_id, hid, "bf16", row, id_dtype, w, "f32", out_ptr, 1, k)
        return per_pass

    one_pass(0)  # warm up: workers awake, pages mapped
    passes, nbytes, start = 0, 0.0, time.perf_counter()
    while passes < 3 or time.perf_counter() - start < seconds:
        passes += 1
        nbytes += one_pass(passes)
    return nbytes / (time.perf_counter() - start) / 1e9


def _engine_counters(llm: Any) -> Callable[[], dict[str, float]]:
    """The CPU engine's cumulative busy time and phases, for `_profile` to diff per step."""
    engine = llm.engine.runner.cpu_experts.engine

    def read() -> dict[str, float]:
        s = engine.stats()
        phases = [ns / 1e6 for ns in s["phase_ns"]]
        return {
            "cpu_layer_calls": s["steps"],
            "cpu_busy_ms": s["busy_ns"] / 1e6,
            **dict(zip(("cpu_gather_ms", "cpu_gate_up_ms", "cpu_down_ms"), phases, strict=True)),
        }

    return read


def _profile_step(llm: Any, prompts: list[list[int]], dtype: str) -> dict[str, float]:
    """Where a batch-1 decode millisecond goes; printed as a table and returned per step."""
    p = _profile(llm, prompts, _engine_counters(llm))
    p["rest_ms"] = p["step_wall_ms"] - p["cpu_busy_ms"] - p.get("step_gpu_ms", 0.0)
    rest = "sync, host functions, copies, scheduler, Python"
    if "step_gpu_ms" not in p:
        rest = "the dense layers on the CPU, scheduler, Python"
    rows = [
        ("wall", p["step_wall_ms"], ""),
        ("CPU experts busy", p["cpu_busy_ms"], f"{p['cpu_layer_calls']:.0f} layer calls"),
        ("  gather", p["cpu_gather_ms"], ""),
        ("  gate+up+SiLU", p["cpu_gate_up_ms"], ""),
        ("  down+sum", p["cpu_down_ms"], ""),
        ("GPU kernels", p.get("step_gpu_ms", 0.0), ""),
        ("rest", p["rest_ms"], rest),
    ]
    print(f"batch-1 decode step, {dtype} experts (ms per step):")
    for name, ms, note in rows:
        print(f"  {name:<18}{ms:8.3f}  {note}")
    return {k: round(v, 4) for k, v in p.items()}


def _build(args: argparse.Namespace, model: str, load_format: str, dtype: str) -> tuple[Any, dict]:
    """The LLM with every routed expert on the CPU as `dtype`, and the host RAM it added."""
    from twinfer import LLM

    gc.collect()
    before = rss_anon()
    cpu_dtype = "keep" if dtype in CHECKPOINT_DTYPES else dtype
    with tempfile.TemporaryDirectory(prefix=f"twinfer-{dtype}-") as work:
        if cpu_dtype == "keep":
            from twinfer.bench.formats import with_format

            # The model's shape as such a checkpoint, its weights random (as the bench model's).
            model, load_format = str(with_format(model, dtype, Path(work))), "dummy"
        llm = LLM(
            model, dtype="bfloat16", load_format=load_format, device=args.device, cpu_moe=True,
            moe_cpu_dtype=cpu_dtype, moe_cpu_group_size=args.group_size,
            moe_cpu_threads=args.threads,
            max_model_len=args.input_len + max(args.output_len, 72) + 16,  # _profile: 64 steps
            max_num_seqs=max(8, args.concurrency), enforce_eager=args.enforce_eager,
        )  # fmt: skip
    gc.collect()
    used, placed = rss_anon() - before, llm.engine.info.moe_plan.bytes_at("host")
    print(f"{dtype}: host RAM +{used / 2**30:.2f} GiB for {placed / 2**30:.2f} GiB of experts")
    return llm, {"value": used / placed, "host_ram_bytes": used, "host_expert_bytes": placed}


def _prepare(args: argparse.Namespace) -> str | None:
    """Check the flags and the machine; returns an error, or None. Clamps --threads."""
    from twinfer.hybrid.numa import CpuTopology
    from twinfer.native import native_engine, native_error

    if native_engine is None:
        return f"twinfer bench hybrid measures the native CPU expert engine: {native_error}"
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda needs a CUDA GPU; use --device cpu."
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if bad := [d for d in args.dtypes if d not in ("bf16", "int8", "int4", *CHECKPOINT_DTYPES)]:
        return (
            f"--dtypes {','.join(bad)}: the host expert formats are bf16, int8, int4, fp8 and "
            "ct_int4."
        )
    cores = CpuTopology.detect().physical_cores
    if args.threads > cores:
        print(f"note: --threads {args.threads} but this machine has {cores} physical cores "
              f"(that this process may use); running {cores} expert threads.")  # fmt: skip
        args.threads = cores
    return None


def main(args: argparse.Namespace) -> int:
    import torch

    if error := _prepare(args):
        print(f"error: {error}")
        return 2
    if args.dram_gbps is None:
        from twinfer.bench.check import measure_dram_gbps

        gbps, method = measure_dram_gbps()
    else:
        gbps, method = args.dram_gbps, "given (--dram-gbps)"
    print(f"machine: DRAM read {gbps:.1f} GB/s ({method})")
    if args.device == "cuda":  # before the first RssAnon: the CUDA context is not the model
        torch.cuda.init()
        torch.ones(1, device="cuda")
    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = _bench_model(args, Path(tmp))
        results = _run(args, model, load_format, gbps, method)
    print("summary (ratio = value / bound):")
    for r in results:
        sign = "<=" if r.get("lower_is_better") else ">="
        target = "-" if r["target"] is None else f"{sign} {r['target']:g}"
        if "speedup_over_bs1" in r:
            target = f"speedup {r['speedup_over_bs1']:.2f}x over batch 1 (target >= 3x)"
        print(f"  {r['benchmark']:<26}{r['value']:>10.2f} {r['unit']:<9} bound {r['bound']:>9.2f}"
              f"  ratio {r['ratio']:.3f}  target {target}")  # fmt: skip
    return 0


def _run(args: argparse.Namespace, model: str, load_format: str, gbps: float, method: str) -> list:
    """Each dtype's LLM in turn (one at a time: the bf16 experts alone take ~14.5 GB)."""
    import torch

    from twinfer.bench.model_cost import ModelCost

    cost = ModelCost.from_pretrained(model, "bfloat16")
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    host_ram: dict[str, dict] = {}
    for dtype in args.dtypes:
        llm, host_ram[dtype] = _build(args, model, load_format, dtype)
        s = llm.engine.info.moe_plan.shapes[0]
        config = {
            "model": BENCH_SHAPE if args.model is None else args.model,
            "num_layers": cost.num_layers, "hidden": s.hidden, "num_experts": s.num_experts,
            "top_k": s.top_k, "expert_inner": s.inner, "weight_dtype": "bfloat16",
            "placement": "all routed experts on the CPU", "dtype": dtype,
            "group_size": llm.engine.info.moe_plan.group_size if dtype != "bf16" else None,
            "host_format": llm.engine.info.moe_plan.host_format, "threads": args.threads,
            "device": args.device, "cuda_graphs": llm.engine.runner.graphs is not None,
            "batch": 1, "input_len": args.input_len, "output_len": args.output_len,
        }  # fmt: skip
        results += _figures(args, llm, config, cost, rng, gbps, method)
        del llm
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    worst = max(host_ram, key=lambda d: host_ram[d]["value"])
    basis = {
        "what": "RssAnon growth while the LLM is built / expert bytes placed in host RAM",
        "ratio": f"value / {HOST_RAM_BOUND}: at most 1 meets the target",
        "figure": f"{worst}, the worse of the dtypes run",
    }
    by_dtype = {d: {k: round(v, 4) for k, v in r.items()} for d, r in host_ram.items()}
    results.append(
        write_result(
            results_dir(args), "hybrid_host_ram", host_ram[worst]["value"], "x", HOST_RAM_BOUND,
            {**config, "dtype": worst, "group_size": None, "batch": None}, bound_basis=basis,
            lower_is_better=True, target=1.0, by_dtype=by_dtype,
        )
    )  # fmt: skip
    return results


def _figures(
    args: argparse.Namespace,
    llm: Any,
    config: dict,
    cost: Any,
    rng: np.random.Generator,
    gbps: float,
    method: str,
) -> list[dict[str, Any]]:
    """One LLM's figures: kernel bandwidth (bf16), batch-1 decode, concurrent decode (int4)."""

    dtype, out = config["dtype"], results_dir(args)
    per_token = llm.engine.info.moe_plan.host_bytes_per_token()
    basis = {"dram_gbps": round(gbps, 1), "method": method, "host_bytes_per_token": per_token}
    results = []
    kernel = kernel_gbps(llm)
    if dtype == "bf16":
        how = "native MoEEngine.forward, batch 1, random distinct top-k, layer after layer"
        results.append(
            write_result(
                out, "cpu_expert_kernel_bw", kernel, "GB/s", gbps, config, bound_basis=basis,
                target=TARGETS["cpu_expert_kernel_bw"], method=how,
            )
        )  # fmt: skip
    vocab = llm.engine.info.vocab_size
    prompts = rng.integers(100, vocab, size=(1, args.input_len)).tolist()
    extra: dict[str, Any] = {"kernel_gbps": round(kernel, 2)}
    if args.profile:
        extra["profile"] = _profile_step(llm, prompts, dtype)
    bs1 = _decode_rate(llm, prompts, args.output_len)
    name = f"hybrid_decode_bs1_{dtype}"
    results.append(
        write_result(
            out, name, bs1, "tokens/s", gbps * 1e9 / per_token, config, bound_basis=basis,
            target=TARGETS.get(name), **extra,
        )
    )  # fmt: skip
    if dtype != "int4":
        return results
    n = args.concurrency
    prompts = rng.integers(100, vocab, size=(n, args.input_len)).tolist()
    rate = _decode_rate(llm, prompts, args.output_len)
    # NOTE: the physical bound is the DRAM time of the distinct experts n tokens touch; with
    # uniform routing 8 tokens read ~6.5x the bytes of one, so 3x batch 1 may lie beyond it.
    experts = cost.expected_experts(n)
    step_bytes = per_token * experts / config["top_k"]
    dram_bound = n * gbps * 1e9 / step_bytes
    results.append(
        write_result(
            out, f"hybrid_decode_c{n}_int4", rate, "tokens/s", dram_bound,
            {**config, "batch": n}, bound_basis=basis, target=None,
            speedup_over_bs1=round(rate / bs1, 3), target_speedup=BATCH_SPEEDUP,
            expected_experts_per_layer=round(experts, 2), step_host_bytes=round(step_bytes),
        )
    )  # fmt: skip
    return results
