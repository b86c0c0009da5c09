"""`twinfer bench throughput`: requests and tokens per second of the offline engine (vLLM's).

All `num_prompts` random token-id prompts go in at once (ignore_eos, greedy) and the engine
batches them as it schedules; the figure is output tokens over the wall time of the whole run.
NOTE: no physical bound is computed yet: `bound` and `ratio` are null in the JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from twinfer.bench.latency import (
    build_llm,
    check_at_least,
    engine_context,
    random_prompts,
    write_json,
)
from twinfer.config import EngineConfig


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=128, help="Prompt tokens per request.")
    parser.add_argument("--output-len", type=int, default=128, help="Tokens generated.")
    parser.add_argument("--num-prompts", type=int, default=64, help="Requests in the run.")
    parser.add_argument("--output-json", type=Path, default=None, help="Write the result here.")
    parser.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    EngineConfig.add_cli_args(parser)


def main(args: argparse.Namespace) -> int:
    from twinfer.sampling_params import SamplingParams

    check_at_least(args, 1, "input_len", "output_len", "num_prompts")
    llm = build_llm(args, args.input_len, args.output_len)
    rng = np.random.default_rng(args.seed)
    vocab = llm.engine.info.vocab_size
    prompts = random_prompts(rng, args.num_prompts, args.input_len, vocab)
    # Warm-up: one short request, so one-time start-up costs stay out of the timed run.
    warm = SamplingParams(temperature=0.0, max_tokens=min(4, args.output_len), ignore_eos=True)
    llm.generate(random_prompts(rng, 1, args.input_len, vocab), warm, use_tqdm=False)

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start

    # Counted from the outputs, not assumed: a short output would otherwise inflate the figure.
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result = {
        "benchmark": "throughput",
        "value": output_tokens / elapsed,
        "unit": "tokens/s",
        "bound": None,
        "ratio": None,
        "elapsed_time": elapsed,
        "num_requests": len(outputs),
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": len(outputs) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "config": engine_context(llm, args, "input_len", "output_len", "num_prompts"),
    }
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s "
        f"({len(outputs)} requests in {elapsed:.2f} s)"
    )
    if args.output_json is not None:
        write_json(args.output_json, result)
    return 0
