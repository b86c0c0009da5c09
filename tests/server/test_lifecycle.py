"""`twinfer serve` lifecycle and robustness: cancellation, overload, shutdown, engine death, auth,
body limits, config.yaml and the startup log.

Each test protects a behaviour a client or operator sees. Servers with special flags run the tiny
random Llama (fast to start); the cancellation storm and /health-under-load use the session
`server` (SmolLM2, slow enough on CPU that long generations are cut mid-flight). Every network call
carries a timeout so a server bug fails a test instead of hanging CI.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

# NOTE: the special tiny servers get the checkpoint's full context so "long" requests really are
# long (thousands of tokens); the tiny model decodes fast.
TINY_CONTEXT = ("--max-model-len", "4096")
ERROR_KEYS = {"message", "type", "param", "code"}
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 120  # ~1200 tokens


# ---- helpers ----


def assert_error(resp: requests.Response | Stream, status: int, code: str | None = None) -> dict:
    """The contract's error shape: {"error": {"message", "type", "param", "code"}}."""
    got_status = resp.status_code if isinstance(resp, requests.Response) else resp.status
    text = resp.text if isinstance(resp, requests.Response) else resp.body.decode(errors="replace")
    assert got_status == status, f"expected {status}, got {got_status}: {text[:500]}"
    body = json.loads(text)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str), err
    if code is not None:
        assert err["code"] == code, err
    return err


def completion(prompt: str = "Hello", max_tokens: int = 16, **extra: Any) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, **extra}


def chat(content: str = "Hello", max_tokens: int = 16, **extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


class Stream:
    """One POST read on its own thread; close() drops the connection like a client going away.

    SSE `data:` payloads land in `events`; a non-SSE answer's bytes in `body`. `cut_after` closes
    the connection that many seconds after connecting (a client timeout).
    """

    def __init__(
        self,
        server: Any,
        path: str,
        body: dict,
        *,
        delay: float = 0.0,
        cut_after: float | None = None,
        timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(server.url)
        self._addr = (parts.hostname, parts.port)
        self._request = (
            path,
            json.dumps(body),
            server.headers({"Content-Type": "application/json"}),
        )
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.events: list[str] = []
        self.body = b""
        self.error: BaseException | None = None
        self.first_event = threading.Event()
        self.done = threading.Event()
        self._sock: socket.socket | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, args=(delay, cut_after, timeout), daemon=True
        )
        self._thread.start()

    def _run(self, delay: float, cut_after: float | None, timeout: float) -> None:
        conn = http.client.HTTPConnection(*self._addr, timeout=timeout)
        try:
            time.sleep(delay)
            conn.connect()
            with self._lock:
                if self._closed:
                    return
                self._sock = conn.sock
            if cut_after is not None:
                timer = threading.Timer(cut_after, self.close)
                timer.daemon = True
                timer.start()
            path, data, headers = self._request
            conn.request("POST", path, body=data, headers=headers)
            resp = conn.getresponse()
            self.status = resp.status
            self.headers = {k.lower(): v for k, v in resp.getheaders()}
            if not self.headers.get("content-type", "").startswith("text/event-stream"):
                self.body = resp.read()
                return
            while line := resp.readline():
                text = line.decode().strip()
                if text.startswith("data:"):
                    self.events.append(text[5:].strip())
                    self.first_event.set()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.error = exc
        finally:
            conn.close()
            self.done.set()

    def close(self) -> None:
        """Disconnect now (shutdown wakes the reader thread; a bare close would not)."""
        with self._lock:
            self._closed = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def wait(self, timeout: float) -> Stream:
        assert self.done.wait(timeout), f"request still running after {timeout}s"
        return self

    def wait_first_event(self, timeout: float) -> Stream:
        assert self.first_event.wait(timeout), (
            f"no SSE event in {timeout}s (status {self.status}, error {self.error!r})"
        )
        return self

    @property
    def chunks(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def engine_pid(server: Any, timeout: float = 10.0) -> int:
    """The engine core pid from the startup log line `engine core process started (pid N)`."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"engine core process started \(pid (\d+)\)", server.log())
        if m:
            return int(m.group(1))
        assert time.monotonic() < deadline, f"no engine pid in the log:\n{server.log()[-3000:]}"
        time.sleep(0.1)


def _proc_stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # [state, ppid, ...]


def descendants(pid: int) -> set[int]:
    """Every live process below pid (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie holds no resources and counts as gone)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def assert_all_gone(pids: set[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes survived the server: {left}"


def decode_rate(server: Any) -> float:
    """Tokens per second of one warm request: sizes the 'long' requests on fast machines."""
    server.post("/v1/completions", json=completion("hi", 4), timeout=60).raise_for_status()
    t0 = time.monotonic()
    r = server.post("/v1/completions", json=completion("hi", 64, ignore_eos=True), timeout=60)
    r.raise_for_status()
    return 64 / (time.monotonic() - t0)


def raw_http(server: Any, request: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send hand-written HTTP/1.1 bytes (lying headers, chunked bodies) and read one response."""
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock, method="POST")
        resp.begin()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def raw_get(server: Any, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (requests/urllib3 would normalize it)."""
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def tiny(tiny_checkpoints) -> Path:
    return tiny_checkpoints("llama-tiny")


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


# ---- auth ----

AUTH_ROUTES: list[tuple[str, str, dict | None]] = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", completion("hi", 1)),
    ("POST", "/v1/chat/completions", chat("hi", 1)),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/metrics", None),
    ("GET", "/version", None),
    ("GET", "/openapi.json", None),
]
REJECTED_AUTH: dict[str, dict[str, str]] = {
    "no header": {},
    "wrong key": {"Authorization": "Bearer wrong"},
    "key prefix": {"Authorization": "Bearer sekre"},
    "key plus suffix": {"Authorization": "Bearer sekretX"},
    "empty bearer": {"Authorization": "Bearer "},
    "no scheme": {"Authorization": "sekret"},
    "lowercase bearer, wrong key": {"Authorization": "bearer wrong"},
    "basic user:key": {"Authorization": "Basic " + base64.b64encode(b"user:sekret").decode()},
    "basic key": {"Authorization": "Basic sekret"},
    "x-api-key": {"x-api-key": "sekret"},
    "api-key": {"api-key": "sekret"},
}
PATH_TRICKS = [
    "/health/../v1/models",
    "/health/%2e%2e/v1/models",
    "/health%2F..%2Fv1%2Fmodels",
    "//v1/models",
    "/v1//models",
    "/v1/models/",
    "/./v1/models",
    "/%761/models",
    "/v1/models%2F",
    "/V1/models",
    "/v1/models?path=/health",
    "/metrics/",
    "//metrics",
    "/version/",
]


@pytest.mark.parametrize("via", ["flag", "env"])
def test_api_key_guards_every_route(start_server, tiny, via):
    """With an API key (--api-key or TWINFER_API_KEY) only `Authorization: Bearer KEY` opens a
    route; no other header, query key or path trick does; /health stays open."""
    if via == "flag":
        srv = start_server("--api-key", "sekret", "--max-model-len", "256", model=tiny)
    else:
        srv = start_server("--max-model-len", "256", model=tiny, env={"TWINFER_API_KEY": "sekret"})

    def call(method: str, path: str, body: dict | None, headers: dict, **kw) -> requests.Response:
        return requests.request(
            method, srv.url + path, json=body, headers=headers, timeout=30, **kw
        )

    lowercase: dict[str, int] = {}
    for method, path, body in AUTH_ROUTES:
        ok = call(method, path, body, {"Authorization": "Bearer sekret"})
        assert 200 <= ok.status_code < 300, (path, ok.status_code, ok.text[:300])
        for name, headers in REJECTED_AUTH.items():
            r = call(method, path, body, headers)
            assert r.status_code == 401, (path, name, r.status_code, r.text[:300])
            err = assert_error(r, 401, "invalid_api_key")
            assert err["type"] == "authentication_error", (path, name, err)
        for params in ({"api_key": "sekret"}, {"key": "sekret"}, {"token": "sekret"}):
            r = call(method, path, body, {}, params=params)
            assert r.status_code == 401, (path, params, r.status_code)
        lowercase[path] = call(method, path, body, {"Authorization": "bearer sekret"}).status_code

    # The contract names `Bearer`; a lowercase scheme with the right key may be accepted (RFC
    # 7235) or refused, but the same way on every route.
    kinds = {("2xx" if 200 <= s < 300 else s) for s in lowercase.values()}
    assert len(kinds) == 1 and kinds <= {"2xx", 401}, lowercase

    for path in PATH_TRICKS:
        status, data = raw_get(srv, path)
        assert status >= 300, (path, status, data[:300])
        assert b'"object":"list"' not in data.replace(b" ", b"") and b"twinfer:" not in data, path

    health = requests.get(srv.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


# ---- request body limit ----


def _json_body(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes."""
    head, tail = b'{"prompt": "', b'", "max_tokens": 1}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_request_body_limit(start_server, tiny):
    """Bodies over --max-request-body-bytes get 413 request_too_large, whether the size is
    declared, understated, or streamed chunked; bodies up to the limit are served."""
    srv = start_server("--max-request-body-bytes", "2000", "--max-model-len", "2048", model=tiny)

    def post(data: bytes) -> requests.Response:
        return requests.post(
            srv.url + "/v1/completions",
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )

    assert post(_json_body(2000)).status_code == 200
    assert_error(post(_json_body(2001)), 413, "request_too_large")
    assert_error(post(_json_body(5000)), 413, "request_too_large")
    assert post(b'{"prompt": "hi", "max_tokens": 1}').status_code == 200

    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\n"
    )
    # Declared over the limit, only part sent: refused from the header, without waiting.
    status, _, body = raw_http(srv, head + b"Content-Length: 5000\r\n\r\n" + _json_body(5000)[:100])
    assert status == 413, body[:300]
    assert json.loads(body)["error"]["code"] == "request_too_large"

    # Chunked, no Content-Length: the limit counts the bytes that arrive.
    def chunked(data: bytes, size: int = 700) -> bytes:
        parts = [data[i : i + size] for i in range(0, len(data), size)]
        return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"

    te = b"Transfer-Encoding: chunked\r\n\r\n"
    status, _, body = raw_http(srv, head + te + chunked(_json_body(5000)))
    assert status == 413, body[:300]
    assert json.loads(body)["error"]["code"] == "request_too_large"
    status, _, body = raw_http(srv, head + te + chunked(_json_body(1500)))
    assert status == 200, body[:300]

    # Understated Content-Length: the server reads what was declared (a broken JSON: 400) and
    # must neither crash nor serve the extra bytes as a request.
    status, _, body = raw_http(srv, head + b"Content-Length: 1500\r\n\r\n" + _json_body(5000))
    assert status in (400, 413), (status, body[:300])
    r = requests.get(srv.url + "/health", timeout=10)
    assert r.status_code == 200


# ---- config.yaml ----


def _serve_exit(tmp_path: Path, yaml_text: str, model: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "twinfer.cli", "serve", str(model), "--config", str(config)]
    args += ["--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_config_file_with_cli_override(start_server, tiny, tmp_path):
    """config.yaml keys (underscores, dashes, dotted nested keys) configure the server and CLI
    flags override them."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "max_num_seqs: 2\n"
        "served-model-name: cfgname\n"
        "max_model_len: 128\n"
        "compilation_config.cudagraph_mode: none\n"
    )
    srv = start_server("--config", str(config), "--max-model-len", "200", model=tiny)
    data = srv.get("/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in data] == [("cfgname", 200)], data
    r = srv.post("/v1/completions", json=completion("hi", 2, model="cfgname"), timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("max_num_seqs: 2\nmax_num_seqz: 2\n", "max_num_seqz"),
        ("compilation_config.bogus_mode: 1\n", "bogus_mode"),
    ],
    ids=["unknown-key", "unknown-dotted-subkey"],
)
def test_config_file_unknown_key_exits_2(tmp_path, tiny, yaml_text, key):
    """A typo in config.yaml stops `twinfer serve` at once with exit code 2 naming the key,
    instead of being silently ignored."""
    result = _serve_exit(tmp_path, yaml_text, tiny)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "error:" in result.stderr and key in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


# ---- startup log ----


def test_startup_log_reports_engine_and_kv_cache(tiny_server):
    """Operators see the engine pid and the KV cache size with the concurrency it allows."""
    log = tiny_server.log()
    assert re.search(r"engine core process started \(pid \d+\)", log), log[-3000:]
    lines = [line for line in log.splitlines() if "KV cache" in line]
    assert any(
        re.search(r"KV cache: [\d,_]+ tokens", line) and "maximum concurrency" in line
        for line in lines
    ), lines or log[-3000:]
