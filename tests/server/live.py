"""Helpers for tests against a live `twinfer serve`: raw HTTP, SSE streams, process trees."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

# NOTE: the special tiny servers get the checkpoint's full context so "long" requests really are
# long (thousands of tokens); the tiny model decodes fast.
TINY_CONTEXT = ("--max-model-len", "4096")
ERROR_KEYS = {"message", "type", "param", "code"}
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 120  # ~1200 tokens


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
