"""`twinfer bench gpu`: decode and prefill on one GPU, each next to its physical bound.

Figures (DESIGN.md's benchmark model by default: the Qwen3-30B-A3B shape with 12 layers, bf16,
random weights, everything on the GPU):
- `gpu_decode_bs1_bf16`: decode tokens/s of one sequence; bound: HBM bytes one step reads (dense
  weights, lm_head, the K routed experts of each layer, the KV) over measured HBM GB/s.
- `gpu_prefill_512_bf16`: tokens/s of prefilling one 512-token prompt (to its first token); bound:
  the larger of its FLOPs over measured bf16 tensor-core TFLOP/s and the weight bytes it reads
  (dense + every routed expert its tokens touch) over HBM GB/s.
- `gpu_decode_c64_bf16`: aggregate decode tokens/s of 64 concurrent sequences; bound as for
  batch 1 with the experts 64 tokens touch and 64 contexts of KV.
With --weight-formats bf16,fp8,ct_int4 the same figures come for the model as a block-FP8 and a
compressed-tensors INT4 checkpoint (`gpu_decode_bs1_fp8`, ...; bench/formats.py), each bound on
that format's bytes (the LM head stays bf16, as the checkpoints keep it).
Times include the whole engine step (scheduler, input preparation, sampling), as a user sees it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from twinfer.bench.results import add_result_args, results_dir, write_result

BENCH_SHAPE = "qwen3-30b-a3b"


def add_common_args(
    parser: argparse.ArgumentParser, input_len: int, output_len: int, concurrency: int
) -> None:
    """The flags `bench gpu` and `bench hybrid` share (with each one's defaults)."""
    parser.add_argument(
        "--model", default=None, help="HF directory (default: the benchmark model, random)."
    )
    parser.add_argument("--num-layers", type=int, default=12, help="Layers of the default model.")
    parser.add_argument(
        "--tokenizer", default=None, help="Tokenizer for the default model (a dir or .gguf)."
    )
    parser.add_argument(
        "--input-len", type=int, default=input_len, help="Prompt tokens for decode."
    )
    parser.add_argument(
        "--output-len", type=int, default=output_len, help="Decode tokens measured."
    )
    parser.add_argument(
        "--concurrency", type=int, default=concurrency, help="Requests at once (batched figure)."
    )
    parser.add_argument("--enforce-eager", action="store_true", help="No CUDA graphs.")
    parser.add_argument("--profile", action="store_true", help="Print a kernel-time profile.")
    add_result_args(parser)


WEIGHT_FORMATS = ("bf16", "fp8", "ct_int4")
# The bytes a weight of each format takes on disk (ModelCost's names): ct_int4 is 4 bits and a
# 16-bit scale per 32 weights.
_COST_DTYPE = {"bf16": "bfloat16", "fp8": "fp8", "ct_int4": "int4"}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser, input_len=128, output_len=128, concurrency=64)
    parser.add_argument("--prefill-len", type=int, default=512, help="Prompt tokens timed.")
    parser.add_argument(
        "--weight-formats",
        default="bf16",
        help="The benchmark model's checkpoint formats, in order: bf16, fp8 (block FP8), "
        "ct_int4 (compressed-tensors INT4 g32); each gets its own figures.",
    )


def _bench_model(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """(model dir, load_format): the given checkpoint, or the benchmark shape's config alone."""
    if args.model is not None:
        return args.model, "auto"
    from twinfer.bench.random_model import DEFAULT_TOKENIZER, make_random_checkpoint

    out = make_random_checkpoint(
        BENCH_SHAPE,
        work / BENCH_SHAPE,
        num_layers=args.num_layers,
        tokenizer_from=args.tokenizer or DEFAULT_TOKENIZER,
        weights=False,
    )
    return str(out), "dummy"


def _decode_rate(llm: Any, prompts: list[list[int]], output_len: int) -> float:
    """Aggregate decode tokens/s, prefill taken off (cpu_decode.decode_rate's method)."""
    from twinfer import SamplingParams
    from twinfer.bench.cpu_decode import decode_rate

    def run(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    return decode_rate(run, len(prompts), output_len)


def _prefill_rate(llm: Any, rng: np.random.Generator, length: int, vocab: int) -> float:
    """Prompt tokens/s to the first token, median of 5 fresh prompts (no prefix-cache hits)."""
    from twinfer import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    times = []
    for i in range(7):
        prompt = rng.integers(100, vocab, size=length).tolist()
        t = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        if i >= 2:  # two warm-ups
            times.append(time.perf_counter() - t)
    return length / statistics.median(times)


def _profile(
    llm: Any, prompts: list[list[int]], counters: Callable[[], dict[str, float]] = dict
) -> dict[str, float]:
    """Where a decode step's time goes: wall time per step against the GPU's kernel time per
    step (the difference is time the GPU waits for the host), and the kernels by total time.

    `counters()` returns cumulative figures (bench hybrid: the CPU expert engine's busy time);
    what they grow by over the timed steps comes back per step. On the CPU: wall and counters.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from twinfer import SamplingParams

    engine = llm.engine
    cuda = engine.info.device.type == "cuda"
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True, detokenize=False)
    ids = [f"profile-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    prof = None
    try:
        while any(
            r.num_computed_tokens < r.num_prompt_tokens
            for r in engine.core.scheduler.requests.values()
        ):
            engine.step()  # prefill
        steps = 32
        if cuda:
            torch.cuda.synchronize()
        before = counters()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
        per_step = {k: (v - before[k]) / steps for k, v in counters().items()}
        if cuda:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    engine.step()
                torch.cuda.synchronize()
    finally:
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    if prof is None:
        return {"step_wall_ms": wall * 1e3, **per_step}
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / steps / 1e6  # s per step
    print(
        f"decode step, batch {len(prompts)}: wall {wall * 1e3:.3f} ms, GPU kernels "
        f"{gpu * 1e3:.3f} ms, GPU waiting for the host {(wall - gpu) * 1e3:.3f} ms"
    )
    print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    return {"step_wall_ms": wall * 1e3, "step_gpu_ms": gpu * 1e3, **per_step}


def main(args: argparse.Namespace) -> int:
    import torch

    from twinfer.bench.check import measure_bf16_tflops, measure_hbm_gbps

    if not torch.cuda.is_available():
        print("error: twinfer bench gpu needs a CUDA GPU; on the CPU use twinfer bench decode.")
        return 2
    formats = [f.strip() for f in args.weight_formats.split(",") if f.strip()]
    if bad := [f for f in formats if f not in WEIGHT_FORMATS]:
        print(f"error: --weight-formats {','.join(bad)}: choose from {', '.join(WEIGHT_FORMATS)}.")
        return 2
    if args.model is not None and formats != ["bf16"]:
        print("error: --weight-formats makes the benchmark model in those formats; drop --model.")
        return 2
    hbm = measure_hbm_gbps()
    tflops = measure_bf16_tflops()
    print(f"machine: HBM {hbm:.0f} GB/s, bf16 {tflops:.0f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = _bench_model(args, Path(tmp))
        for fmt in formats:
            _run_format(args, fmt, model, load_format, hbm, tflops)
            gc.collect()
            torch.cuda.empty_cache()
    return 0


def _run_format(
    args: argparse.Namespace, fmt: str, model: str, load_format: str, hbm: float, tflops: float
) -> None:
    """One weight format's figures: decode at batch 1 and at --concurrency, prefill."""
    from twinfer import LLM
    from twinfer.bench.model_cost import ModelCost

    rng = np.random.default_rng(0)
    cost = ModelCost.from_pretrained(model, _COST_DTYPE[fmt])
    # NOTE: checkpoints in a weight format keep the LM head in the model dtype (bf16).
    head_extra = 0 if fmt == "bf16" else cost.lm_head_params * (2 - cost.bytes_per_param)
    if fmt != "bf16":  # the model's shape as such a checkpoint, its weights random
        from twinfer.bench.formats import with_format

        model = str(with_format(model, fmt, Path(model).parent / f"{Path(model).name}-{fmt}"))
        load_format = "dummy"
    max_len = max(args.input_len + args.output_len, args.prefill_len) + 16
    llm = LLM(
        model,
        dtype="bfloat16",
        load_format=load_format,
        max_model_len=max_len,
        max_num_seqs=max(args.concurrency, 1),
        enforce_eager=args.enforce_eager,
    )
    vocab = llm.engine.info.vocab_size
    shape = {
        "model": BENCH_SHAPE if args.model is None else args.model,
        "num_layers": cost.num_layers,
        "dtype": "bfloat16",
        "weight_format": fmt if fmt == "bf16" else llm.engine.info.quant_config.describe(),
        "placement": "all on the GPU",
        "cuda_graphs": llm.engine.runner.graphs is not None,
        "attention_backend": llm.engine.runner.attn_backend.name,
        "weight_bytes": cost.weight_bytes + head_extra,
    }
    basis = {"hbm_gbps": round(hbm, 1), "bf16_tflops": round(tflops, 1)}
    for batch in (1, args.concurrency):
        prompts = rng.integers(100, vocab, size=(batch, args.input_len)).tolist()
        rate = _decode_rate(llm, prompts, args.output_len)
        # Mean context over the measured steps: the prompt plus half the output.
        context = args.input_len + args.output_len // 2
        step_bytes = cost.decode_bytes_per_step(batch, context) + head_extra
        bound = batch * hbm * 1e9 / step_bytes
        name = f"gpu_decode_bs1_{fmt}" if batch == 1 else f"gpu_decode_c{batch}_{fmt}"
        config = {**shape, "batch": batch, "input_len": args.input_len}
        config["output_len"] = args.output_len
        extra: dict[str, Any] = {"bytes_per_step": round(step_bytes)}
        if args.profile:
            extra.update(_profile(llm, prompts))
        write_result(
            results_dir(args), name, rate, "tokens/s", bound, config, bound_basis=basis, **extra
        )
    rate = _prefill_rate(llm, rng, args.prefill_len, vocab)
    # NOTE: the prefill bound counts bf16 FLOPs for every format (H100 FP8 tensor cores are 2x,
    # but the activations' quantization and the block scales cost too): a conservative bound.
    bound = cost.prefill_bound_tokens_per_s(args.prefill_len, tflops, hbm)
    write_result(
        results_dir(args),
        f"gpu_prefill_{args.prefill_len}_{fmt}",
        rate,
        "tokens/s",
        bound,
        {**shape, "prompt_len": args.prefill_len},
        bound_basis=basis,
        flops=cost.prefill_flops(args.prefill_len),
    )
    del llm
