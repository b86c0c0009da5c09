"""CPU decode speed of twinfer vs transformers `generate` on the same model, same run.

Figures: decode tokens/s at batch 1 and aggregate decode tokens/s with 16 concurrent requests.
Bound: weight (+ KV) bytes per step over measured DRAM read bandwidth, or the FLOPs of a step over
measured matmul throughput, whichever is slower.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain how a transistor works.",
    "Les plus belles villes de France sont",
    "Once upon a time in a small village,",
    "The three laws of thermodynamics state",
    "List five fruits that are red:",
]


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Model (default: embedded SmolLM2).")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--skip-hf", action="store_true", help="Do not run the baseline.")


def measure_dram_gbps(nbytes: int = 2 * 2**30) -> float:
    """Read bandwidth with all threads: sum over a buffer far larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def measure_matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _twinfer_rate(llm: Any, prompts: list[str], output_len: int) -> float:
    """Decode tokens/s: (outputs - first tokens) over (time with outputs - time for one token)."""
    from twinfer import SamplingParams

    def run(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    run(4)  # warm up
    first = min(run(1) for _ in range(2))
    full = run(output_len)
    return len(prompts) * (output_len - 1) / (full - first)


def _hf_rate(model: Any, tok: Any, prompts: list[str], output_len: int) -> float:
    """The same figure for transformers generate (batched with left padding when > 1 prompt)."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    run(4)
    first = min(run(1) for _ in range(2))
    full = run(output_len)
    return len(prompts) * (output_len - 1) / (full - first)


def main(args: argparse.Namespace) -> int:
    from twinfer import LLM
    from twinfer.bench.results import write_result
    from twinfer.loader.resolve import resolve_model

    llm = LLM(args.model, max_num_seqs=max(args.concurrency, 1))
    engine = llm.engine
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    n_params = sum(p.numel() for p in engine.runner.model.parameters())
    dtype = engine.info.dtype
    gbps = measure_dram_gbps()
    gflops = measure_matmul_gflops(dtype)
    print(
        f"machine: DRAM read {gbps:.1f} GB/s, {dtype} matmul {gflops:.0f} GFLOP/s, "
        f"weights {weights / 2**20:.0f} MiB"
    )

    hf = tok = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = resolve_model(args.model)
        kw = {"gguf_file": src.path.name} if src.kind == "gguf" else {}
        folder = src.path.parent if src.kind == "gguf" else src.path
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).eval()

    shape = {
        "model": engine.model_name,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "output_len": args.output_len,
    }
    for batch in (1, args.concurrency):
        prompts = [
            PROMPTS[i % len(PROMPTS)] + f" ({i})" * (i >= len(PROMPTS)) for i in range(batch)
        ]
        ours = _twinfer_rate(llm, prompts, args.output_len)
        extra: dict[str, Any] = {}
        if hf is not None:
            base = _hf_rate(hf, tok, prompts, args.output_len)
            extra = {
                "baseline_transformers_tok_s": round(base, 2),
                "speedup_vs_transformers": round(ours / base, 2),
            }
        # Bytes per step: all weights once; FLOPs per step: 2 per parameter per sequence.
        bound = min(gbps * 1e9 / weights * batch, gflops * 1e9 / (2 * n_params))
        name = "cpu_decode_bs1_smollm2" if batch == 1 else f"cpu_decode_c{batch}_smollm2"
        write_result(
            args.results_dir,
            name,
            ours,
            "tokens/s",
            bound,
            {**shape, "concurrency": batch},
            **extra,
            bound_basis={
                "dram_gbps": round(gbps, 1),
                "matmul_gflops": round(gflops, 1),
                "weight_bytes": weights,
            },
        )
    return 0
