"""`twinfer bench serve`: metric arithmetic, the random dataset, Poisson arrivals, and a full run
against a fake OpenAI streaming server (some of whose requests fail)."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from twinfer.bench import serve
from twinfer.bench.serve import RequestRecord, arrival_times, random_requests, summarize


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    return parser.parse_args(list(argv))


# ---- summarize ----
def ok(ttft: float, latency: float, out: int, itl: list[float], prompt: int = 10) -> RequestRecord:
    return RequestRecord(True, "", prompt, out, ttft, itl, latency, "x" * out)


def test_summarize_exact_statistics() -> None:
    records = [
        ok(0.1, 1.0, 10, [0.1] * 9),
        ok(0.2, 2.0, 10, [0.2] * 9),
        ok(0.3, 3.0, 4, [0.9, 0.9, 0.9]),
        ok(0.4, 4.0, 1, []),  # one token: no TPOT, no ITL
        RequestRecord(error="HTTP 503: busy", prompt_len=10),
        RequestRecord(error="boom", prompt_len=10),
    ]
    m = summarize(records, duration=2.0)
    assert (m["completed"], m["failed"]) == (4, 2)
    assert sorted(m["errors"]) == ["HTTP 503: busy", "boom"]
    # Tokens of successful requests only.
    assert m["total_input_tokens"] == 40 and m["total_output_tokens"] == 25
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(12.5)
    assert m["total_token_throughput"] == pytest.approx(32.5)
    assert m["mean_ttft_ms"] == pytest.approx(250.0)
    assert m["median_ttft_ms"] == pytest.approx(250.0)
    assert m["p99_ttft_ms"] == pytest.approx(397.0)  # linear: 100 + 0.99 * 3 * 100
    assert m["std_ttft_ms"] == pytest.approx(np.std([100, 200, 300, 400]))
    assert m["mean_e2el_ms"] == pytest.approx(2500.0)
    # TPOT = (e2e - ttft) / (out - 1): 0.1, 0.2, 0.9 s.
    assert m["mean_tpot_ms"] == pytest.approx(400.0)
    assert m["median_tpot_ms"] == pytest.approx(200.0)
    # ITL pools every gap: 9 x 100, 9 x 200, 3 x 900 ms.
    assert m["mean_itl_ms"] == pytest.approx((900 + 1800 + 2700) / 21)
    assert m["median_itl_ms"] == pytest.approx(200.0)
    assert m["p99_itl_ms"] == pytest.approx(900.0)


def test_summarize_all_failed_is_zero_not_an_error() -> None:
    m = summarize([RequestRecord(error="refused")] * 3, duration=1.0)
    assert (m["completed"], m["failed"]) == (0, 3)
    assert m["mean_ttft_ms"] == m["p99_e2el_ms"] == m["output_throughput"] == 0.0


# ---- the random dataset and arrivals ----
def test_random_requests_lengths_and_ids() -> None:
    reqs = random_requests(50, input_len=32, output_len=8, vocab_size=500, seed=3)
    assert all(r.prompt_len == len(r.prompt) == 32 and r.output_len == 8 for r in reqs)
    ids = [t for r in reqs for t in r.prompt]
    assert min(ids) >= 100 and max(ids) < 600
    assert len({tuple(r.prompt) for r in reqs}) == 50


def test_random_requests_range_ratio() -> None:
    reqs = random_requests(400, input_len=100, output_len=10, range_ratio=0.5, seed=0)
    ins = [len(r.prompt) for r in reqs]
    outs = [r.output_len for r in reqs]
    assert 50 <= min(ins) < 60 and 140 < max(ins) <= 150
    assert min(outs) >= 5 and max(outs) <= 15 and len(set(outs)) > 5


def test_random_requests_seeded() -> None:
    a = random_requests(5, 16, 4, 0.3, seed=7)
    assert a == random_requests(5, 16, 4, 0.3, seed=7)
    assert a != random_requests(5, 16, 4, 0.3, seed=8)


def test_random_chat_prompts_are_words() -> None:
    reqs = random_requests(3, input_len=20, output_len=4, chat=True)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 20 for r in reqs)


def test_poisson_arrivals() -> None:
    times = arrival_times(20001, rate=50.0, seed=1)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)  # exponential: std = mean
    assert times == arrival_times(20001, rate=50.0, seed=1)
    assert times != arrival_times(20001, rate=50.0, seed=2)
    assert arrival_times(4, rate=float("inf")) == [0.0] * 4


# ---- a fake OpenAI server ----
class FakeServer:
    """Streams `max_tokens` chunks of "x"; request k fails with HTTP 503 when k % 5 == 1 and
    with an error event mid-stream when k % 5 == 3."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self.headers: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "org/fake-model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        k = len(self.payloads)
        self.payloads.append(body)
        self.headers.append(dict(request.headers))
        if k % 5 == 1:
            return web.Response(status=503, text="server busy")
        chat = request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(data: dict | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await resp.write(f"data: {text}\n\n".encode())

        n = body["max_tokens"]
        for i in range(n):
            if k % 5 == 3 and i == 1:
                await send({"error": {"message": "engine died", "code": 500}})
                return resp
            await asyncio.sleep(0.002)
            last = "length" if i == n - 1 else None
            choice = {"index": 0, "logprobs": None, "finish_reason": last}
            choice.update({"delta": {"content": "x"}} if chat else {"text": "x"})
            obj = "chat.completion.chunk" if chat else "text_completion"
            await send(
                {
                    "id": "c",
                    "object": obj,
                    "created": 0,
                    "model": body["model"],
                    "choices": [choice],
                }
            )
        prompt_len = 7 if chat else len(body["prompt"])
        usage = {
            "prompt_tokens": prompt_len,
            "completion_tokens": n,
            "total_tokens": prompt_len + n,
        }
        await send({"id": "c", "object": "text_completion", "choices": [], "usage": usage})
        await send("[DONE]")
        return resp

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self) -> FakeServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server


def test_end_to_end_against_a_fake_server(fake: FakeServer, tmp_path: Path, capsys) -> None:
    args = parse(
        "--base-url", fake.url, "--num-prompts", "10", "--random-input-len", "12",
        "--random-output-len", "6", "--ignore-eos", "--api-key", "sk-test", "--disable-tqdm",
        "--save-result", "--result-dir", str(tmp_path), "--seed", "5",
    )  # fmt: skip
    assert serve.main(args) == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Mean TTFT (ms):" in out

    assert len(fake.payloads) == 10
    for p, h in zip(fake.payloads, fake.headers, strict=True):
        assert p["model"] == "org/fake-model"  # from GET /v1/models
        assert p["stream"] is True and p["stream_options"] == {"include_usage": True}
        assert p["ignore_eos"] is True and p["temperature"] == 0.0 and p["max_tokens"] == 6
        assert len(p["prompt"]) == 12 and all(100 <= t < 1100 for t in p["prompt"])
        assert h["Authorization"] == "Bearer sk-test"

    (saved,) = tmp_path.glob("serve-fake-model-*.json")
    r = json.loads(saved.read_text())
    assert (r["completed"], r["failed"]) == (6, 4)
    assert sorted(set(r["errors"])) == ["HTTP 503: server busy", "engine died"]
    assert r["total_input_tokens"] == 6 * 12 and r["total_output_tokens"] == 6 * 6
    assert r["output_throughput"] == pytest.approx(36 / r["duration"])
    assert r["request_throughput"] == pytest.approx(6 / r["duration"])
    assert r["total_token_throughput"] == pytest.approx(108 / r["duration"])
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert r[f"mean_{key}_ms"] > 0 and r[f"p99_{key}_ms"] >= r[f"median_{key}_ms"] > 0
    assert r["mean_e2el_ms"] > r["mean_ttft_ms"] and r["mean_itl_ms"] >= 2.0
    assert {"machine", "date", "commit", "config"} <= r.keys()
    assert r["config"]["num_prompts"] == 10 and "api_key" not in r["config"]
    assert r["config"]["request_rate"] == "inf" and "Infinity" not in saved.read_text()
    assert r["benchmark"] == "serve" and r["value"] == r["output_throughput"]


def test_chat_endpoint_rate_and_concurrency(fake: FakeServer, tmp_path: Path) -> None:
    args = parse(
        "--base-url", fake.url, "--endpoint", "/v1/chat/completions", "--model", "m",
        "--num-prompts", "5", "--random-input-len", "8", "--random-output-len", "3",
        "--request-rate", "100", "--max-concurrency", "2", "--disable-tqdm",
    )  # fmt: skip
    r = serve.run_benchmark(args)
    assert (r["completed"], r["failed"]) == (3, 2)
    assert r["total_input_tokens"] == 3 * 7  # the server's usage, not the word count
    p = fake.payloads[0]
    assert p["messages"][0]["role"] == "user" and len(p["messages"][0]["content"].split()) == 8
    assert p["max_completion_tokens"] == 3 and "ignore_eos" not in p


def test_unreachable_server() -> None:
    with pytest.raises(ValueError, match="pass --model"):
        serve.run_benchmark(parse("--base-url", "http://127.0.0.1:9", "--disable-tqdm"))
    # With --model the run goes on: every request fails and is counted, none crashes.
    start = time.perf_counter()
    r = serve.run_benchmark(
        parse("--base-url", "http://127.0.0.1:9", "--model", "m", "--num-prompts", "3",
              "--disable-tqdm")
    )  # fmt: skip
    assert (r["completed"], r["failed"]) == (0, 3) and r["errors"][0].startswith("Client")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset-name", "sharegpt"], "use random"),
        (["--endpoint", "/v1/embeddings"], "/v1/chat/completions"),
        (["--num-prompts", "0"], "--num-prompts must be at least 1"),
        (["--random-input-len", "0"], "--random-input-len must be at least 1"),
        (["--random-range-ratio", "1.5"], r"\[0, 1\)"),
        (["--request-rate", "0"], "--request-rate must be positive"),
        (["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
    ],
)
def test_bad_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serve.run_benchmark(parse("--model", "m", *argv))
