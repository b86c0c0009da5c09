"""Schemathesis fuzzing of `twinfer serve` against its own /openapi.json (tiny model).

Whatever a client sends, valid per the schema (positive mode) or not (negative mode), the server
answers with a 2xx or a 4xx error, never a 5xx, and it is healthy afterwards. Bounded to a few
examples per operation so CI (2 cores) spends about a minute here.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis

MAX_EXAMPLES = 25


def _load_schema(server, mode: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "generation": {"mode": mode, "max-examples": MAX_EXAMPLES, "database": "none"},
            # NOTE: the coverage phase adds the schema's boundary values (deterministic and cheap
            # for this schema); stateful sequences have nothing to chain in this API.
            "phases": {"coverage": {"enabled": True}, "stateful": {"enabled": False}},
            "suppress-health-check": ["all"],
            "request-timeout": 60,
        }
    )
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=config, timeout=30)


@pytest.fixture(scope="module")
def positive_schema(tiny_server):
    return _load_schema(tiny_server, "positive")


@pytest.fixture(scope="module")
def negative_schema(tiny_server):
    return _load_schema(tiny_server, "negative")


def _has_inputs(ctx) -> bool:
    raw = ctx.operation.definition.raw  # the operation as the schema writes it
    return "requestBody" in raw or bool(raw.get("parameters"))


positive = schemathesis.pytest.from_fixture("positive_schema")
# NOTE: an operation without inputs (GET /health) has nothing to negate; schemathesis 4.x then
# raises a SkipTest that its lazy pytest loader reports as a failure, so such operations are left
# out of the negative run (the positive run covers them).
negative = schemathesis.pytest.from_fixture("negative_schema").include(_has_inputs)


# The first 5xx of the session: after a crash every later case fails too (and Hypothesis shrinks
# those to trivial requests), so the request that caused it is kept and named in every failure.
_first_failure: list[str] = []


def _call_no_5xx(case: schemathesis.Case) -> None:
    response = case.call(timeout=60)
    if response.status_code >= 500:
        failure = (
            f"{case.method} {case.formatted_path} -> {response.status_code}: "
            f"{response.text[:500]}\nreproduce: {case.as_curl_command()}"
        )
        if not _first_failure:
            _first_failure.append(failure)
        pytest.fail(f"{failure}\nfirst 5xx of this run: {_first_failure[0]}")


@positive.parametrize()
def test_schema_valid_requests_never_5xx(case):
    """Every request the schema allows is served or refused with a 4xx, never a server error."""
    _call_no_5xx(case)


@negative.parametrize()
def test_schema_invalid_requests_never_5xx(case):
    """Malformed requests (wrong types, missing fields, bad values) get a 4xx, never a 5xx."""
    _call_no_5xx(case)


def test_server_healthy_after_fuzzing(tiny_server):
    """Fuzzing leaves the server serving: /health ok and a plain completion works."""
    assert requests.get(tiny_server.url + "/health", timeout=10).json() == {"status": "ok"}
    r = tiny_server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    tiny_server.wait_idle(2.0)
