"""`twinfer serve` lifecycle: cancellation, load, overload, SIGTERM drain, engine death.

Each test protects a behaviour a client or operator sees. Servers with special flags run the tiny
random Llama (fast to start); the cancellation storm and /health-under-load use the session
`server` (SmolLM2, slow enough on CPU that long generations are cut mid-flight). Every network call
carries a timeout so a server bug fails a test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest
import requests

from tests.server.live import (
    ERROR_KEYS,
    LONG_TEXT,
    TINY_CONTEXT,
    Stream,
    assert_all_gone,
    assert_error,
    chat,
    completion,
    decode_rate,
    descendants,
    engine_pid,
)

# ---- cancellation and load (session server, real model) ----


def test_cancellation_storm_frees_everything(server):
    """Clients that time out at any stage (queued, mid-prefill, mid-decode; streaming or not)
    leave no running request and no KV block behind, and the server keeps serving."""
    model = server.model
    # Decoding requests first, so some cuts certainly land mid-decode.
    decoders = [
        Stream(server, path, make("Count to a thousand:", 1500, ignore_eos=True, stream=True))
        for path, make in [("/v1/completions", completion), ("/v1/chat/completions", chat)] * 2
    ]
    deadline = time.monotonic() + 60
    while any(len(d.events) < 2 for d in decoders):  # chat's first event is the role only
        assert time.monotonic() < deadline, "decoders produced no token in 60 s"
        time.sleep(0.05)
    rng = random.Random(1234)
    storm: list[Stream] = []
    for i in range(52):
        path, make = [("/v1/completions", completion), ("/v1/chat/completions", chat)][i % 2]
        prompt = LONG_TEXT if i % 3 == 0 else f"Tell me a story about number {i}."
        body = make(prompt, 400, ignore_eos=True, stream=(i // 2) % 2 == 0, model=model)
        storm.append(Stream(server, path, body, delay=rng.uniform(0, 1.5), cut_after=0.5))
    for k, d in enumerate(decoders):
        timer = threading.Timer(0.2 + 0.3 * k, d.close)
        timer.daemon = True
        timer.start()
    for s in storm + decoders:
        s.wait(15)

    bad = [(s.status, s.text[:200]) for s in storm if s.status not in (None, 200)]
    assert not bad, f"cut requests got error answers: {bad}"
    before_headers = sum(s.status is None for s in storm)
    no_token = sum(s.status == 200 and not s.events for s in storm)
    mid_stream = sum(bool(s.events) for s in storm)
    print(
        f"storm: {before_headers} cut before headers, {no_token} before a token, {mid_stream} mid"
    )
    assert all(d.events and "[DONE]" not in d.events for d in decoders), "decoders finished?"

    t0 = time.monotonic()
    r = server.post("/v1/completions", json=completion("Hello", 8, model=model), timeout=60)
    latency = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert latency < 5.0, f"a fresh request took {latency:.1f}s after the storm (limit 5 s)"
    server.wait_idle(2.0)
    assert server.proc.poll() is None


def test_health_stays_fast_under_load(server):
    """/health answers 200 within 1 s while 16 long generations run (probes never flap)."""
    streams = [
        Stream(
            server,
            "/v1/completions",
            completion(f"Write a long essay, part {i}:", 1500, ignore_eos=True, stream=True),
        )
        for i in range(16)
    ]
    try:
        for s in streams:
            s.wait_first_event(120)
        deadline = time.monotonic() + 3.0
        polls = 0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            r = requests.get(server.url + "/health", timeout=1.0)
            elapsed = time.monotonic() - t0
            assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
            assert elapsed < 1.0, f"/health took {elapsed:.2f}s under load"
            polls += 1
            time.sleep(0.1)
        assert polls >= 10
        running = server.metrics().get("twinfer:num_requests_running", 0.0)
        assert running >= 16, f"premise: 16 generations should still run, metrics say {running}"
    finally:
        for s in streams:
            s.close()
        for s in streams:
            s.wait(10)
    server.wait_idle(2.0)


# ---- overload ----


def test_queue_full_gives_503_server_overloaded(start_server, tiny):
    """Beyond max_num_seqs + max_queued_requests a request is refused at once with 503,
    Retry-After and code server_overloaded (streaming too, as JSON), and serving resumes."""
    srv = start_server(
        "--max-num-seqs", "1", "--max-queued-requests", "1", *TINY_CONTEXT, model=tiny
    )
    held = [Stream(srv, "/v1/completions", completion("a", 4000, ignore_eos=True, stream=True))]
    try:
        held[0].wait_first_event(30)  # running, so the next one is the only one waiting
        held.append(
            Stream(srv, "/v1/completions", completion("b", 4000, ignore_eos=True, stream=True))
        )
        deadline = time.monotonic() + 10
        while srv.metrics().get("twinfer:num_requests_waiting", 0.0) < 1:
            assert time.monotonic() < deadline, (
                f"second request never queued: status {held[1].status} {held[1].text[:300]}, "
                f"first done {held[0].done.is_set()}, {held[0].events[-2:]}"
            )
            time.sleep(0.05)

        r = srv.post("/v1/completions", json=completion("c", 4), timeout=10)
        assert_error(r, 503, "server_overloaded")
        assert r.headers.get("Retry-After"), r.headers
        r = srv.post("/v1/chat/completions", json=chat("c", 4, stream=True), timeout=10)
        assert_error(r, 503, "server_overloaded")
        assert r.headers.get("Retry-After"), r.headers
        assert not held[0].done.is_set(), "premise: the first request should still be running"

        # The queued one goes away: an n=2 request still does not fit (it counts 2).
        held[1].close()
        held[1].wait(10)
        deadline = time.monotonic() + 2
        while srv.metrics().get("twinfer:num_requests_waiting", 0.0) > 0:
            assert time.monotonic() < deadline, "closed queued request still waiting after 2 s"
            time.sleep(0.05)
        r = srv.post("/v1/completions", json=completion("d", 4, n=2), timeout=10)
        assert_error(r, 503, "server_overloaded")
    finally:
        for s in held:
            s.close()
        for s in held:
            s.wait(10)
    srv.wait_idle(2.0)
    r = srv.post("/v1/completions", json=completion("e", 4), timeout=30)
    assert r.status_code == 200, r.text


# ---- shutdown ----


def test_sigterm_drains_in_flight_requests(start_server, tiny):
    """SIGTERM: /health says draining, new requests get 503 server_draining, the running stream
    finishes normally, then the process exits 0 with no child left behind."""
    srv = start_server("--shutdown-timeout", "20", *TINY_CONTEXT, model=tiny)
    max_tokens = int(min(4000, max(200, decode_rate(srv) * 4)))  # ~4 s of decoding
    stream = Stream(
        srv,
        "/v1/completions",
        completion("drain me", max_tokens, ignore_eos=True, stream=True),
        timeout=40,
    )
    stream.wait_first_event(30)
    pids = descendants(srv.proc.pid) | {engine_pid(srv)}

    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    health = requests.get(srv.url + "/health", timeout=5)
    late = requests.post(srv.url + "/v1/completions", json=completion("late", 4), timeout=5)
    still_running = not stream.done.is_set()
    assert health.status_code == 503 and health.json() == {"status": "draining"}, health.text
    assert_error(late, 503, "server_draining")
    assert late.headers.get("Retry-After"), late.headers
    assert still_running, "premise: the stream should outlive the checks above"

    stream.wait(25)
    assert stream.status == 200 and stream.error is None, (stream.status, stream.error)
    assert stream.events[-1] == "[DONE]", stream.events[-3:]
    chunks = stream.chunks
    assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert finishes[-1] == "length" and finishes.count("length") == 1, finishes[-3:]
    assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks if c.get("choices")) > 0

    assert srv.proc.wait(timeout=25) == 0, srv.log()[-3000:]
    assert time.monotonic() - t0 < 20 + 5
    assert_all_gone(pids)


def test_sigterm_respects_shutdown_timeout(start_server, tiny):
    """A request that would outlast --shutdown-timeout does not keep the server alive: it exits
    about then, the client is not left hanging, and no child survives."""
    srv = start_server("--shutdown-timeout", "2", *TINY_CONTEXT, model=tiny)
    rate = decode_rate(srv)
    stream = Stream(
        srv, "/v1/completions", completion("x", 4000, ignore_eos=True, stream=True), timeout=30
    )
    stream.wait_first_event(30)
    pids = descendants(srv.proc.pid) | {engine_pid(srv)}
    assert 4000 / rate > 4, f"premise: 4000 tokens at {rate:.0f} tok/s outlast 2 s"

    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        srv.proc.wait(timeout=2 + 5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {time.monotonic() - t0:.1f}s after SIGTERM (timeout 2s)")
    elapsed = time.monotonic() - t0
    assert elapsed < 2 + 4, f"exited after {elapsed:.1f}s with --shutdown-timeout 2"
    stream.wait(5)
    assert "[DONE]" not in stream.events or any("error" in c for c in stream.chunks), (
        "a request cut by shutdown must not look finished"
    )
    assert_all_gone(pids)


def test_engine_death_fails_requests_fast(start_server, tiny):
    """If the engine process dies, in-flight requests end with an error at once (a stream with an
    error event then [DONE], a plain request with 503 engine_dead) and /health says dead."""
    srv = start_server(*TINY_CONTEXT, model=tiny)
    stream = Stream(srv, "/v1/completions", completion("s", 4000, ignore_eos=True, stream=True))
    plain = Stream(srv, "/v1/chat/completions", chat("p", 4000, ignore_eos=True))
    stream.wait_first_event(30)
    deadline = time.monotonic() + 10
    while srv.metrics().get("twinfer:num_requests_running", 0.0) < 2:
        assert time.monotonic() < deadline, "premise: both requests should be running"
        time.sleep(0.05)

    os.kill(engine_pid(srv), signal.SIGKILL)
    stream.wait(10)
    plain.wait(10)

    events = stream.events
    if "[DONE]" in events:  # else the connection was closed, which is acceptable too
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]
        err = json.loads(events[-2])["error"]
        assert set(err) == ERROR_KEYS, err
    assert not any(c.get("choices") and c["choices"][0]["finish_reason"] for c in stream.chunks)
    assert_error(plain, 503, "engine_dead")
    assert plain.headers.get("retry-after"), plain.headers

    deadline = time.monotonic() + 5
    while (health := requests.get(srv.url + "/health", timeout=2)).status_code != 503:
        assert time.monotonic() < deadline, f"/health still {health.status_code} after death"
        time.sleep(0.1)
    assert health.json() == {"status": "dead"}, health.text
    r = requests.post(srv.url + "/v1/completions", json=completion("after", 4), timeout=5)
    assert_error(r, 503, "engine_dead")
    assert r.headers.get("Retry-After"), r.headers
