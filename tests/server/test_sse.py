"""The raw server-sent-events contract of streamed completions, read byte by byte with `requests`.

Clients other than the `openai` package parse the stream by hand, so the framing is part of the
API: `data: {json}\\n\\n` events ending in `data: [DONE]\\n\\n`, one id, a role chunk first, exactly
one finish_reason per choice, and a usage chunk only when asked for. Runs on the tiny model.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import requests

if TYPE_CHECKING:
    from conftest import Server

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MAX_MODEL_LEN = 256  # tiny_server


def request_body(path: str, **fields: Any) -> dict[str, Any]:
    """A small valid request for `path`, fields added; the tiny model's text does not matter."""
    if path == CHAT:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "Say something."}]}
    else:
        body = {"prompt": "Once upon a time"}
    return body | {"max_tokens": 5, "temperature": 0, "ignore_eos": True} | fields


def stream(server: Server, path: str, body: dict[str, Any]) -> tuple[requests.Response, list]:
    """POST with stream=true; check the SSE framing; return the response and the JSON chunks."""
    r = server.post(path, json=body | {"stream": True}, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].split(";")[0].strip() == "text/event-stream"
    raw = b"".join(r.iter_content(chunk_size=None)).decode()
    r.close()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")
    assert events[-1] == ""  # the text ends with the blank line after [DONE]
    events = events[:-1]
    for event in events:
        assert event.startswith("data: "), f"not a data event: {event!r}"
        assert "\n" not in event and "\r" not in event, f"multi-line event: {event!r}"
    payloads = [event.removeprefix("data: ") for event in events]
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks, "no chunk before [DONE]"
    for chunk in chunks:
        assert "error" not in chunk, chunk
    return r, chunks


def chunk_text(chunk_choice: dict[str, Any], path: str) -> str:
    if path == CHAT:
        return chunk_choice["delta"].get("content") or ""
    return chunk_choice["text"]


def check_choices(chunks: list[dict], path: str, n: int) -> dict[int, list[dict]]:
    """Per-choice checks; returns {index: [choice entries in order]}."""
    per_index: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            per_index.setdefault(choice["index"], []).append(choice)
    assert sorted(per_index) == list(range(n))
    for index, entries in per_index.items():
        finishes = [e.get("finish_reason") for e in entries]
        assert [f for f in finishes if f is not None] == [finishes[-1]], (index, finishes)
        assert finishes[-1] in ("length", "stop")
        if path == CHAT:
            first = entries[0]["delta"]
            assert first.get("role") == "assistant", (index, first)
            assert first.get("content") == "", (index, first)
            assert all(e["delta"].get("role") in (None, "assistant") for e in entries)
    return per_index


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT], ids=["completions", "chat"])
def test_stream_framing_ids_and_objects(tiny_server: Server, path: str) -> None:
    """Framing, content type, one id and created for every chunk, the object name, the model."""
    _, chunks = stream(tiny_server, path, request_body(path))
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert isinstance(chunks[0]["created"], int)
    expected_object = "chat.completion.chunk" if path == CHAT else "text_completion"
    assert {c["object"] for c in chunks} == {expected_object}
    assert {c["model"] for c in chunks} == {"tiny"}
    if path == COMPLETIONS:
        assert chunks[0]["id"].startswith("cmpl-")
    per_index = check_choices(chunks, path, n=1)
    assert per_index[0][-1]["finish_reason"] == "length"
    for chunk in chunks:
        assert "usage" not in chunk, chunk  # no include_usage: no usage key at all


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT], ids=["completions", "chat"])
def test_stream_n2_one_finish_per_choice(tiny_server: Server, path: str) -> None:
    """n=2 streams both choices, each with its role chunk (chat) and exactly one finish_reason."""
    body = request_body(path, n=2, temperature=0.8, seed=5, max_tokens=4)
    _, chunks = stream(tiny_server, path, body)
    assert len({c["id"] for c in chunks}) == 1
    per_index = check_choices(chunks, path, n=2)
    for entries in per_index.values():
        assert entries[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT], ids=["completions", "chat"])
def test_stream_include_usage(tiny_server: Server, path: str) -> None:
    """include_usage: one final chunk with choices [] and the usage; others carry usage null."""
    body = request_body(path, n=2, max_tokens=4, stream_options={"include_usage": True})
    _, chunks = stream(tiny_server, path, body)
    usage_chunks = [c for c in chunks if c.get("usage") is not None]
    assert usage_chunks == [chunks[-1]]
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
    assert usage["completion_tokens"] == 2 * 4  # ignore_eos: both choices run to max_tokens
    for chunk in chunks[:-1]:
        assert "usage" in chunk and chunk["usage"] is None, chunk
        assert chunk["choices"], chunk
    check_choices(chunks[:-1], path, n=2)

    del body["stream_options"]
    full = tiny_server.post(path, json=body)
    assert full.status_code == 200, full.text
    assert full.json()["usage"] == usage


def test_completions_stream_with_echo(tiny_server: Server) -> None:
    """echo in a stream: the text starts with the prompt and joins to the non-streamed text."""
    body = request_body(COMPLETIONS, echo=True, max_tokens=3)
    _, chunks = stream(tiny_server, COMPLETIONS, body)
    text = "".join(chunk_text(ch, COMPLETIONS) for c in chunks for ch in c["choices"])
    assert text.startswith(body["prompt"])
    full = tiny_server.post(COMPLETIONS, json=body)
    assert full.status_code == 200, full.text
    assert text == full.json()["choices"][0]["text"]
    check_choices(chunks, COMPLETIONS, n=1)

    # max_tokens 0 with echo streams the prompt alone.
    _, chunks = stream(tiny_server, COMPLETIONS, body | {"max_tokens": 0})
    text = "".join(chunk_text(ch, COMPLETIONS) for c in chunks for ch in c["choices"])
    assert text == body["prompt"]
    check_choices(chunks, COMPLETIONS, n=1)


def test_stream_batch_of_prompts(tiny_server: Server) -> None:
    """A streamed [str] batch with n=2: indices prompt_index * n + i, usage over all of them."""
    prompts = ["a b", "c d e"]
    counts = [tiny_server.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts]
    body = request_body(COMPLETIONS, prompt=prompts, n=2, max_tokens=2, echo=True)
    _, chunks = stream(tiny_server, COMPLETIONS, body | {"stream_options": {"include_usage": True}})
    per_index = check_choices(chunks[:-1], COMPLETIONS, n=4)
    for index, entries in per_index.items():
        text = "".join(chunk_text(e, COMPLETIONS) for e in entries)
        assert text.startswith(prompts[index // 2]), (index, text)
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == sum(counts)
    assert usage["completion_tokens"] == 4 * 2
    assert usage["total_tokens"] == sum(counts) + 8


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT], ids=["completions", "chat"])
def test_stream_joins_to_non_stream(tiny_server: Server, path: str) -> None:
    """At temperature 0 the joined stream text equals the non-streamed text."""
    body = request_body(path, max_tokens=8)
    _, chunks = stream(tiny_server, path, body)
    text = "".join(chunk_text(ch, path) for c in chunks for ch in c["choices"])
    full = tiny_server.post(path, json=body).json()["choices"][0]
    assert text == (full["message"]["content"] if path == CHAT else full["text"])


def _check_context_error(r: requests.Response, *numbers: int) -> None:
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].split(";")[0].strip() == "application/json"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    for number in numbers:
        assert str(number) in error["message"], (number, error["message"])


def test_over_long_prompt_streamed_is_json_400(tiny_server: Server) -> None:
    """prompt + max_tokens > max_model_len with stream=true: a JSON 400 with the numbers, no SSE."""
    body = {"prompt": [100] * 250, "max_tokens": 10, "stream": True}
    r = tiny_server.post(COMPLETIONS, json=body, stream=True)
    _check_context_error(r, 250, 10, MAX_MODEL_LEN)

    # The prompt alone is too long (default max_tokens 16).
    r = tiny_server.post(COMPLETIONS, json={"prompt": [100] * 300, "stream": True}, stream=True)
    _check_context_error(r, 300, MAX_MODEL_LEN)

    messages = [{"role": "user", "content": "hello " * 100}]
    tokenized = tiny_server.post(
        "/tokenize", json={"messages": messages, "add_generation_prompt": True}
    )
    count = tokenized.json()["count"]
    max_tokens = MAX_MODEL_LEN - count + 1
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True}
    r = tiny_server.post(CHAT, json=body, stream=True)
    _check_context_error(r, count, max_tokens, MAX_MODEL_LEN)


def test_prompt_filling_max_model_len_exactly_streams(tiny_server: Server) -> None:
    """prompt + max_tokens == max_model_len is allowed (the bound is inclusive)."""
    body = {"prompt": [100] * 250, "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    _, chunks = stream(tiny_server, COMPLETIONS, body | {"stream_options": {"include_usage": True}})
    usage = chunks[-1]["usage"]
    assert usage == {"prompt_tokens": 250, "completion_tokens": 6, "total_tokens": 256}


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT], ids=["completions", "chat"])
def test_stream_logprobs_cover_every_token(tiny_server: Server, path: str) -> None:
    """Streamed logprobs: one entry per generated token, their tokens join to the streamed text."""
    fields = {"logprobs": True, "top_logprobs": 2} if path == CHAT else {"logprobs": 2}
    body = request_body(path, max_tokens=6, stream_options={"include_usage": True}, **fields)
    _, chunks = stream(tiny_server, path, body)
    tokens: list[str] = []
    text = ""
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            text += chunk_text(choice, path)
            lp = choice.get("logprobs")
            if lp is None:
                continue
            if path == CHAT:
                assert all(len(item["top_logprobs"]) == 2 for item in lp["content"])
                tokens += [item["token"] for item in lp["content"]]
            else:
                assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
                tokens += lp["tokens"]
    assert len(tokens) == chunks[-1]["usage"]["completion_tokens"] == 6
    assert "".join(tokens) == text


def test_stream_stop_string(tiny_server: Server) -> None:
    """A streamed stop string is held back: the joined text ends before it, finish "stop"."""
    body = request_body(COMPLETIONS, max_tokens=24)
    full = tiny_server.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop, full
    _, chunks = stream(tiny_server, COMPLETIONS, body | {"stop": [stop]})
    text = "".join(chunk_text(ch, COMPLETIONS) for c in chunks for ch in c["choices"])
    assert text == full[: full.index(stop)]
    per_index = check_choices(chunks, COMPLETIONS, n=1)
    assert per_index[0][-1]["finish_reason"] == "stop"
