"""`twinfer bench latency`: seconds to generate one batch end to end, offline (vLLM's).

A batch of random token-id prompts runs prefill plus `output_len` decode steps (ignore_eos, greedy);
the figure is the wall time of the whole batch over `num_iters` runs after `num_iters_warmup`.
NOTE: no physical bound is computed yet: `bound` and `ratio` are null in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twinfer.config import EngineConfig

if TYPE_CHECKING:
    from twinfer.entrypoints.llm import LLM

VOCAB_START = 100  # ids below are often special tokens (BOS, EOS, chat markers)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=32, help="Prompt tokens per request.")
    parser.add_argument("--output-len", type=int, default=128, help="Tokens generated.")
    parser.add_argument("--batch-size", type=int, default=8, help="Requests per batch.")
    parser.add_argument("--num-iters-warmup", type=int, default=1, help="Untimed batches first.")
    parser.add_argument("--num-iters", type=int, default=3, help="Timed batches.")
    parser.add_argument("--output-json", type=Path, default=None, help="Write the result here.")
    parser.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    EngineConfig.add_cli_args(parser)


def check_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """Raise a ValueError naming the flag when a count is below `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value < minimum:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least {minimum}, got {value}; pass a larger one.")


def build_llm(args: argparse.Namespace, input_len: int, output_len: int) -> LLM:
    """The engine the flags describe, checked to fit prompt + output (else output is cut short)."""
    from twinfer.entrypoints.llm import LLM

    config = EngineConfig.from_cli_args(args)
    if config.max_model_len is not None and input_len + output_len > config.max_model_len:
        _too_long(input_len, output_len, config.max_model_len)
    llm = LLM(**dataclasses.asdict(config))
    if input_len + output_len > llm.engine.info.max_model_len:
        _too_long(input_len, output_len, llm.engine.info.max_model_len)
    return llm


def _too_long(input_len: int, output_len: int, max_model_len: int) -> None:
    raise ValueError(
        f"--input-len {input_len} + --output-len {output_len} exceeds max_model_len "
        f"{max_model_len}; raise --max-model-len or shorten the input or output."
    )


def random_prompts(
    rng: np.random.Generator, num: int, input_len: int, vocab_size: int
) -> list[list[int]]:
    """`num` prompts of `input_len` random token ids, above the usual special tokens."""
    low = VOCAB_START if vocab_size > VOCAB_START else 0
    return rng.integers(low, vocab_size, size=(num, input_len)).tolist()


def engine_context(llm: LLM, args: argparse.Namespace, *bench_flags: str) -> dict[str, Any]:
    """The `config` of a result: engine settings as given and as resolved, plus the bench flags."""
    info = llm.engine.info
    return {
        **dataclasses.asdict(llm.engine.config),
        "model_name": llm.engine.model_name,
        "resolved_dtype": str(info.dtype).removeprefix("torch."),
        "resolved_device": str(info.device),
        "resolved_max_model_len": info.max_model_len,
        **{name: getattr(args, name) for name in bench_flags},
    }


def write_json(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Add machine, date and commit to a result and write it as JSON to `path`."""
    from twinfer.bench.results import git_commit, machine

    full = {
        **result,
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2, default=str) + "\n")
    print(f"saved {path}")
    return full


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from twinfer.sampling_params import SamplingParams

    check_at_least(args, 1, "input_len", "output_len", "batch_size", "num_iters")
    check_at_least(args, 0, "num_iters_warmup")
    llm = build_llm(args, args.input_len, args.output_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rng = np.random.default_rng(args.seed)
    vocab = llm.engine.info.vocab_size

    def run_batch() -> float:
        # NOTE: fresh prompts every run: repeating one would let prefix caching skip the prefill.
        prompts = random_prompts(rng, args.batch_size, args.input_len, vocab)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in tqdm(range(args.num_iters_warmup), desc="Warmup", disable=args.disable_tqdm):
        run_batch()
    latencies = [
        run_batch() for _ in tqdm(range(args.num_iters), desc="Iters", disable=args.disable_tqdm)
    ]
    pct = {p: float(np.percentile(latencies, p)) for p in (10, 25, 50, 75, 90, 99)}
    result = {
        "benchmark": "latency",
        "value": float(np.mean(latencies)),
        "unit": "s",
        "bound": None,
        "ratio": None,
        "avg_latency": float(np.mean(latencies)),
        "p50_latency": pct[50],
        "p90_latency": pct[90],
        "p99_latency": pct[99],
        "latencies": latencies,
        "percentiles": {str(p): v for p, v in pct.items()},  # vLLM's layout
        "config": engine_context(
            llm, args, "input_len", "output_len", "batch_size", "num_iters_warmup", "num_iters"
        ),
    }
    print(f"Avg latency: {result['avg_latency']:.4f} seconds")
    for p in (50, 90, 99):
        print(f"{p}% percentile latency: {pct[p]:.4f} seconds")
    if args.output_json is not None:
        write_json(args.output_json, result)
    return 0
