"""`twinfer bench serve`: latency and throughput of any OpenAI-compatible server (vLLM's).

Every request streams. Per request: TTFT (time to the first content chunk), ITL (gaps between
content chunks), TPOT ((E2E - TTFT) / (output tokens - 1)) and E2E latency. Token counts come
from the server's `usage` (asked for with `stream_options.include_usage`): no tokenizer needed.
NOTE: no physical bound is known for a remote server: `bound` and `ratio` are null in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_START = 100  # ids below are often special tokens (BOS, EOS, chat markers)
# Words that are one token in common BPE vocabularies (with their leading space).
WORDS = (  # noqa: SIM905 - prose is easier to read than 80 quoted words
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water"
).split()


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="The server to load.")
    parser.add_argument(
        "--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions."
    )
    parser.add_argument("--model", default=None, help="Default: the first of GET /v1/models.")
    parser.add_argument("--tokenizer", default=None, help="Only to count tokens without usage.")
    parser.add_argument("--dataset-name", default="random", help="random (the only one yet).")
    parser.add_argument(
        "--random-input-len", type=int, default=128, help="Prompt tokens per request."
    )
    parser.add_argument(
        "--random-output-len", type=int, default=128, help="Output tokens per request."
    )
    parser.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="Lengths in len * [1-r, 1+r]."
    )
    parser.add_argument(
        "--random-vocab-size", type=int, default=1000, help="Prompt token ids in [100, 100+V)."
    )
    parser.add_argument("--num-prompts", type=int, default=100, help="Requests in all.")
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second."
    )
    parser.add_argument(
        "--max-concurrency", type=int, help="Most requests in flight (default: no limit)."
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="Sampling temperature of every request."
    )
    parser.add_argument("--ignore-eos", action="store_true", help="Send ignore_eos (vLLM).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random prompts.")
    parser.add_argument("--api-key", default=None, help="Default: $OPENAI_API_KEY.")
    parser.add_argument(
        "--save-result", action="store_true", help="Write the metrics as JSON (see --result-dir)."
    )
    parser.add_argument(
        "--result-dir", type=Path, default=Path("bench/results"), help="Where --save-result writes."
    )
    parser.add_argument(
        "--result-filename", help="File name under --result-dir (default: from the run's settings)."
    )
    parser.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")


@dataclass(slots=True)
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass(slots=True)
class RequestRecord:
    """What one request measured (times in seconds from its send)."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    text: str = ""


def _range(n: int, ratio: float) -> tuple[int, int]:
    return max(1, int(np.floor(n * (1 - ratio)))), max(1, int(np.ceil(n * (1 + ratio))))


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    vocab_size: int = 1000,
    seed: int = 0,
    chat: bool = False,
) -> list[SampleRequest]:
    """Random prompts: token ids for /v1/completions, common words for chat (text only there)."""
    rng = np.random.default_rng([seed, 0])
    in_lens = rng.integers(*_range(input_len, range_ratio), endpoint=True, size=num)
    out_lens = rng.integers(*_range(output_len, range_ratio), endpoint=True, size=num)
    out = []
    for n, m in zip(in_lens.tolist(), out_lens.tolist(), strict=True):
        if chat:
            prompt: str | list[int] = " ".join(rng.choice(WORDS, size=n).tolist())
        else:
            prompt = rng.integers(VOCAB_START, VOCAB_START + vocab_size, size=n).tolist()
        out.append(SampleRequest(prompt, n, m))
    return out


def arrival_times(num: int, rate: float, seed: int = 0) -> list[float]:
    """Send offsets in seconds: the first at 0, then exponential gaps of mean 1/rate (Poisson)."""
    if rate == float("inf"):
        return [0.0] * num
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=max(num - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num]


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000 if values_s else np.zeros(1)
    return {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
        f"p99_{name}_ms": float(np.percentile(ms, 99)),
    }


def summarize(records: list[RequestRecord], duration: float) -> dict[str, Any]:
    """Aggregate metrics over the successful requests (vLLM's names; latencies in ms)."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    # TPOT needs at least two tokens: the first one's time is TTFT.
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        **_stats("ttft", [r.ttft for r in ok]),
        **_stats("tpot", tpots),
        **_stats("itl", [gap for r in ok for gap in r.itl]),
        **_stats("e2el", [r.latency for r in ok]),
        "errors": [r.error for r in records if not r.success],
    }


async def _send(session: Any, url: str, payload: dict, headers: dict, chat: bool) -> RequestRecord:
    """Stream one request; any failure becomes the record's error, never an exception."""
    rec = RequestRecord()
    start = last = time.perf_counter()
    finished = False
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments (keep-alives)
                body = line.removeprefix("data:").strip()
                if body == "[DONE]":
                    break
                data = json.loads(body)
                if "error" in data:
                    err = data["error"]
                    rec.error = str(err.get("message", err) if isinstance(err, dict) else err)
                    return rec
                choice = (data.get("choices") or [{}])[0]
                finished = finished or choice.get("finish_reason") is not None
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    now = time.perf_counter()
                    if rec.text:
                        rec.itl.append(now - last)
                    else:
                        rec.ttft = now - start
                    last = now
                    rec.text += text
                if usage := data.get("usage"):
                    rec.prompt_len = usage.get("prompt_tokens") or rec.prompt_len
                    rec.output_tokens = usage.get("completion_tokens") or rec.output_tokens
        rec.latency = time.perf_counter() - start
        # An empty completion (e.g. EOS first) still succeeded; its first token came at the end.
        rec.success = bool(rec.text or rec.output_tokens or finished)
        if not rec.success:
            rec.error = "the stream ended without any completion chunk"
        elif not rec.text:
            rec.ttft = rec.latency
    except Exception as exc:  # a failed request is a measurement, never a crash
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _first_model(base_url: str, headers: dict[str, str]) -> str:
    import aiohttp

    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(url, headers=headers) as resp,
        ):
            resp.raise_for_status()
            return (await resp.json())["data"][0]["id"]
    except (aiohttp.ClientError, TimeoutError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"could not read the model name from {url} ({type(exc).__name__}: {exc}); start the "
            "server, fix --base-url, or pass --model."
        ) from exc


def _validate(args: argparse.Namespace) -> None:
    if args.dataset_name != "random":
        raise ValueError(f"--dataset-name {args.dataset_name!r} is not supported; use random.")
    if not args.endpoint.endswith("completions"):
        raise ValueError(
            f"--endpoint {args.endpoint!r} is not supported; use /v1/completions or "
            "/v1/chat/completions."
        )
    for flag in ("num_prompts", "random_input_len", "random_output_len", "random_vocab_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1.")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1).")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be positive (inf: all requests at once).")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1 (leave it out for no limit).")


async def _benchmark(
    args: argparse.Namespace, model: str, requests: list[SampleRequest], tokenizer: Any
) -> tuple[list[RequestRecord], float]:
    import aiohttp
    from tqdm.auto import tqdm

    chat = args.endpoint.endswith("chat/completions")
    url = args.base_url.rstrip("/") + args.endpoint
    headers = _headers(args.api_key)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(requests), disable=args.disable_tqdm, dynamic_ncols=True)

    async def one(session: Any, req: SampleRequest) -> RequestRecord:
        payload: dict[str, Any] = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": req.output_len,
            "temperature": args.temperature,
        }
        if chat:
            # NOTE: both spellings: vLLM prefers max_completion_tokens, older servers max_tokens.
            payload["messages"] = [{"role": "user", "content": req.prompt}]
            payload["max_completion_tokens"] = req.output_len
        else:
            payload["prompt"] = req.prompt
        if args.ignore_eos:
            payload["ignore_eos"] = True
        if sem is None:
            rec = await _send(session, url, payload, headers, chat)
        else:
            async with sem:
                rec = await _send(session, url, payload, headers, chat)
        rec.prompt_len = rec.prompt_len or req.prompt_len
        if rec.success and not rec.output_tokens:
            # No usage from the server: the tokenizer's count, else one token per chunk.
            n = len(tokenizer.encode(rec.text, add_special_tokens=False)) if tokenizer else 0
            rec.output_tokens = n or len(rec.itl) + 1
        bar.update(1)
        return rec

    # limit=0: no client-side connection cap, so only --max-concurrency limits concurrency.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks = []
        times = arrival_times(len(requests), args.request_rate, args.seed)
        for req, at in zip(requests, times, strict=True):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, req)))
        records = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    return records, duration


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark the flags describe and return the metrics plus its context."""
    _validate(args)
    chat = args.endpoint.endswith("chat/completions")
    model = args.model or asyncio.run(_first_model(args.base_url, _headers(args.api_key)))
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load --tokenizer {args.tokenizer!r}: {exc}") from exc
    requests = random_requests(
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.random_range_ratio,
        args.random_vocab_size,
        args.seed,
        chat,
    )
    if tokenizer is not None and chat:
        for r in requests:  # exact prompt lengths where usage is missing
            r.prompt_len = len(tokenizer.encode(r.prompt, add_special_tokens=False))
    records, duration = asyncio.run(_benchmark(args, model, requests, tokenizer))
    metrics = summarize(records, duration)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    if config["request_rate"] == float("inf"):
        config["request_rate"] = "inf"  # JSON has no infinity
    return {
        "benchmark": "serve",
        "value": metrics["output_throughput"],
        "unit": "tokens/s",
        "bound": None,
        "ratio": None,
        "model": model,
        "config": {**config, "model": model},
        **metrics,
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [r.itl for r in records],
        "e2els": [r.latency for r in records],
    }


def print_result(result: dict[str, Any]) -> None:
    """vLLM's result table."""

    def row(name: str, value: float | int) -> None:
        print(f"{name:<40} {value:.2f}" if isinstance(value, float) else f"{name:<40} {value}")

    print(f"{' Serving Benchmark Result ':=^50}")
    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result["config"].get("max_concurrency"):
        row("Maximum request concurrency:", result["config"]["max_concurrency"])
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total Token throughput (tok/s):", result["total_token_throughput"])
    for key, title, label in (
        ("ttft", "Time to First Token", "TTFT"),
        ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl", "Inter-token Latency", "ITL"),
        ("e2el", "End-to-end Latency", "E2EL"),
    ):
        print(f"{title:-^50}")
        for stat in ("mean", "median", "std", "p99"):
            row(f"{stat.capitalize()} {label} (ms):", result[f"{stat}_{key}_ms"])
    print("=" * 50)
    errors: dict[str, int] = {}
    for e in result["errors"]:
        errors[e] = errors.get(e, 0) + 1
    for e, n in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"{n} failed: {e}")


def main(args: argparse.Namespace) -> int:
    result = run_benchmark(args)
    print_result(result)
    if args.save_result:
        from twinfer.bench.results import git_commit, machine

        now = dt.datetime.now(dt.UTC)
        # NOTE: machine is the client's; the server may run elsewhere.
        result = {
            **result,
            "machine": machine(),
            "date": now.isoformat(timespec="seconds"),
            "commit": git_commit(),
        }
        name = re.sub(r"[^\w.-]+", "-", result["model"].rstrip("/").split("/")[-1])
        filename = args.result_filename or f"serve-{name}-{now:%Y%m%d-%H%M%S}.json"
        args.result_dir.mkdir(parents=True, exist_ok=True)
        path = args.result_dir / filename
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"saved {path}")
    return 0
