"""`twinfer serve` access and configuration: the API key, the body limit, config.yaml and the
startup log, each on a server started with those flags (the tiny random Llama)."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.server.live import (
    assert_error,
    chat,
    completion,
    raw_get,
    raw_http,
)

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
    """Operators see the engine pid, the KV cache size (once) with the concurrency it allows, and
    the sampling defaults requests start from."""
    log = tiny_server.log()
    assert re.search(r"engine core process started \(pid \d+\)", log), log[-3000:]
    lines = [line for line in log.splitlines() if "KV cache:" in line]
    assert len(lines) == 1, lines or log[-3000:]
    assert re.search(r"KV cache: \d+ blocks x \d+ tokens = \d+ tokens", lines[0]), lines
    assert "max concurrency" in lines[0], lines
    assert "sampling defaults:" in log, log[-3000:]
