"""Real `twinfer serve` processes on loopback for the server tests.

`server` is the embedded default model (SmolLM2) and `tiny_server` a random tiny Llama with a short
max_model_len (fast, for fuzzing and protocol tests); `start_server(...)` starts one with any
flags and stops it after the test. After every test, each session server must be idle again:
no running or waiting request and every KV block free (the engine-empty invariant, seen from
/metrics).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

STARTUP_TIMEOUT_S = 180.0
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `twinfer serve` process and helpers to talk to it."""

    url: str
    proc: subprocess.Popen
    log_path: Path
    api_key: str | None = None
    model: str = ""
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def base_url(self) -> str:
        """For the openai client: `OpenAI(base_url=server.base_url, ...)`."""
        return self.url + "/v1"

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return headers | (extra or {})

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        kwargs["headers"] = self.headers(kwargs.get("headers"))
        return self.session.get(self.url + path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        kwargs["headers"] = self.headers(kwargs.get("headers"))
        return self.session.post(self.url + path, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Prometheus text parsed into {"name{labels}": value} and {"name": value} (summed)."""
        text = self.get("/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = _METRIC_LINE.match(line)
            if not m:
                continue
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            out[name + labels] = value
            if labels:
                out[name] = out.get(name, 0.0) + value
        return out

    def wait_idle(self, timeout: float = 5.0) -> dict[str, float]:
        """Wait until no request runs or waits and every KV block is free; fail otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = (
                m.get("twinfer:num_requests_running", 0.0),
                m.get("twinfer:num_requests_waiting", 0.0),
                m.get("twinfer:kv_cache_usage_perc", 0.0),
            )
            if busy == (0.0, 0.0, 0.0):
                return m
            if time.monotonic() > deadline:
                pytest.fail(f"server not idle after {timeout}s: running, waiting, kv = {busy}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(model: str | Path | None, *flags: str, log_dir: Path, env: dict | None = None) -> Server:
    """Start `twinfer serve` and wait until /health answers 200."""
    port = free_port()
    args = [sys.executable, "-m", "twinfer.cli", "serve"]
    if model is not None:
        args.append(str(model))
    args += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *flags]
    log_path = log_dir / f"server-{port}.log"
    full_env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    api_key = None
    if "--api-key" in flags:
        api_key = flags[flags.index("--api-key") + 1]
    api_key = api_key or (env or {}).get("TWINFER_API_KEY")
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, api_key=api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"twinfer serve exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if requests.get(server.url + "/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            pytest.fail(f"twinfer serve not healthy in {STARTUP_TIMEOUT_S}s:\n{server.log()}")
        time.sleep(0.2)
    server.model = server.get("/v1/models").json()["data"][0]["id"]
    return server


_session_servers: list[Server] = []


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    """The embedded default model (SmolLM2-135M-Instruct), default flags, max_model_len 2048."""
    s = launch(None, "--max-model-len", "2048", log_dir=tmp_path_factory.mktemp("server"))
    _session_servers.append(s)
    yield s
    _session_servers.remove(s)
    s.stop()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_checkpoints) -> Server:
    """A random tiny Llama (fast): max_model_len 256, for protocol and fuzz tests."""
    s = launch(
        tiny_checkpoints("llama-tiny"),
        "--max-model-len",
        "256",
        "--served-model-name",
        "tiny",
        log_dir=tmp_path_factory.mktemp("tiny-server"),
    )
    _session_servers.append(s)
    yield s
    _session_servers.remove(s)
    s.stop()


@pytest.fixture
def tiny(tiny_checkpoints) -> Path:
    """The tiny random Llama's checkpoint directory (fast to start; for `start_server`)."""
    return tiny_checkpoints("llama-tiny")


@pytest.fixture
def start_server(tmp_path):
    """start_server(*flags, model=None, env=None) -> Server, stopped (SIGKILL) after the test."""
    started: list[Server] = []

    def start(*flags: str, model: str | Path | None = None, env: dict | None = None) -> Server:
        s = launch(model, *flags, log_dir=tmp_path, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop(signal.SIGKILL)


@pytest.fixture(autouse=True)
def servers_idle_after_test():
    """The engine-empty invariant for the session servers, checked after each test."""
    yield
    for s in list(_session_servers):
        if s.proc.poll() is None:
            s.wait_idle(timeout=5.0)
