"""Bad requests get a clear 4xx in the OpenAI error shape, and the server keeps serving.

One table: each case is a request a client can get wrong (broken JSON, wrong types, values out of
range, unsupported OpenAI features, wrong routes). Every answer must be the contract's status with
{"error": {"message", "type", "param", "code"}}, never a 422 (FastAPI's default) or a 5xx, and
after every case a normal small completion still answers 200.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Server

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
VOCAB = 49152  # the tiny model's vocabulary (SmolLM2 tokenizer)
MAX_MODEL_LEN = 256  # tiny_server
_DROP = object()


@dataclass(frozen=True)
class Case:
    id: str
    body: Any = field(repr=False)  # JSON value, bytes as they are, Chunked, or None: no body
    path: str = COMPLETIONS
    method: str = "POST"
    status: int = 400
    code: str | None = None  # error.code, where the contract fixes it
    mentions: tuple[str, ...] = ()  # must appear in error.message (or be error.param)


@dataclass(frozen=True)
class Chunked:
    """Bytes sent with Transfer-Encoding: chunked (no Content-Length to check up front)."""

    data: bytes = field(repr=False)


def cmpl(**fields: Any) -> dict[str, Any]:
    """A valid small completion request with fields changed (_DROP removes one)."""
    body = {"prompt": "hi", "max_tokens": 1} | fields
    return {k: v for k, v in body.items() if v is not _DROP}


def chat(**fields: Any) -> dict[str, Any]:
    """A valid small chat request with fields changed (_DROP removes one)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1} | fields
    return {k: v for k, v in body.items() if v is not _DROP}


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
PREDICTION = {"type": "content", "content": "x"}
BIG = b'{"prompt": "' + b"a" * (2 << 20) + b'", "max_tokens": 1}'  # over the 1 MiB default
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def unsupported(id: str, path: str, field: str, body: dict[str, Any]) -> Case:
    return Case(id, body, path, mentions=(field, "support"))


CASES = [
    # --- the body is not a JSON object ---
    Case("malformed-json", b'{"prompt": "hi",'),
    Case("malformed-json-chat", b'{"messages": [}', CHAT),
    Case("body-array", b"[]"),
    Case("body-array-chat", b"[]", CHAT),
    Case("body-string", b'"x"'),
    Case("body-number", b"3"),
    Case("body-null", b"null"),
    Case("body-null-chat", b"null", CHAT),
    Case("empty-body", b""),
    Case("empty-body-chat", b"", CHAT),
    Case("invalid-utf8", b'{"prompt": "\xff\xfe", "max_tokens": 1}'),
    Case("deeply-nested-json", DEEP),
    Case("body-over-limit", BIG, status=413, code="request_too_large"),
    Case("chunked-body-over-limit", Chunked(BIG), status=413, code="request_too_large"),
    Case("nan-temperature", b'{"prompt": "hi", "max_tokens": 1, "temperature": NaN}'),
    Case("infinity-top-p", b'{"prompt": "hi", "max_tokens": 1, "top_p": Infinity}'),
    # --- wrong types ---
    Case("prompt-int", cmpl(prompt=5)),
    Case("prompt-mixed-list", cmpl(prompt=["a", 1])),
    Case("prompt-mixed-nested", cmpl(prompt=[[1, 2], "a"])),
    Case("prompt-float-ids", cmpl(prompt=[1.5, 2])),
    Case("prompt-object", cmpl(prompt={"text": "hi"})),
    Case("max-tokens-str", cmpl(max_tokens="ten")),
    Case("max-tokens-fraction", cmpl(max_tokens=2.5)),
    Case("max-tokens-beyond-int64", cmpl(max_tokens=2**70)),
    Case("max-tokens-numeric-str", cmpl(max_tokens="2")),
    Case("max-tokens-bool", cmpl(max_tokens=True)),
    Case("temperature-str", cmpl(temperature="hot")),
    Case("temperature-numeric-str", cmpl(temperature="0.5")),
    Case("temperature-overflow", b'{"prompt": "hi", "max_tokens": 1, "temperature": 1e999}'),
    Case("user-int", cmpl(user=5)),
    Case("stream-str", cmpl(stream="yes")),
    Case("echo-str", cmpl(echo="yes")),
    Case("seed-fraction", cmpl(seed=1.5)),
    Case("model-int", cmpl(model=5)),
    Case("stop-int", cmpl(stop=5)),
    Case("stream-options-str", cmpl(stream=True, stream_options="yes")),
    Case("messages-str", chat(messages="hi"), CHAT),
    Case("message-not-object", chat(messages=["hi"]), CHAT),
    Case("message-content-int", chat(messages=user(5)), CHAT),
    Case("message-without-role", chat(messages=[{"content": "hi"}]), CHAT),
    Case("text-part-text-int", chat(messages=user([{"type": "text", "text": 5}])), CHAT),
    Case("text-part-without-text", chat(messages=user([{"type": "text"}])), CHAT),
    Case("chat-logprobs-str", chat(logprobs="yes"), CHAT),
    # --- missing or empty ---
    Case("missing-prompt", cmpl(prompt=_DROP)),
    Case("missing-messages", chat(messages=_DROP), CHAT),
    Case("empty-messages", chat(messages=[]), CHAT),
    Case("empty-prompt-list", cmpl(prompt=[])),
    Case("empty-token-list", cmpl(prompt=[[]])),
    Case("empty-prompt-string", cmpl(prompt="")),
    Case("empty-prompt-string-in-batch", cmpl(prompt=["a", ""])),
    # --- unknown names ---
    Case("unknown-model", cmpl(model="no-such-model"), status=404, code="model_not_found"),
    Case(
        "unknown-model-chat", chat(model="no-such-model"), CHAT, status=404, code="model_not_found"
    ),
    # --- lengths ---
    Case("max-tokens-negative", cmpl(max_tokens=-1)),
    Case("max-tokens-zero-without-echo", cmpl(max_tokens=0)),
    Case("max-tokens-zero-chat", chat(max_tokens=0), CHAT),
    Case("max-completion-tokens-negative", chat(max_completion_tokens=-5), CHAT),
    Case(
        "prompt-plus-max-tokens-too-long",
        cmpl(prompt=[1] * 250, max_tokens=10),
        code="context_length_exceeded",
        mentions=("250", "10", str(MAX_MODEL_LEN)),
    ),
    Case(
        "prompt-too-long",
        cmpl(prompt=[1] * 300, max_tokens=_DROP),
        code="context_length_exceeded",
        mentions=("300", str(MAX_MODEL_LEN)),
    ),
    Case(
        "max-tokens-huge",
        cmpl(max_tokens=10**9),
        code="context_length_exceeded",
        mentions=(str(10**9), str(MAX_MODEL_LEN)),
    ),
    Case(
        "chat-max-tokens-too-long",
        chat(max_tokens=300),
        CHAT,
        code="context_length_exceeded",
        mentions=("300", str(MAX_MODEL_LEN)),
    ),
    # --- n ---
    Case("n-huge", cmpl(n=10**6)),
    Case("n-129", cmpl(n=129)),
    Case("n-zero", cmpl(n=0)),
    Case("n-negative", cmpl(n=-1)),
    Case("n-zero-chat", chat(n=0), CHAT),
    # --- token ids ---
    Case("token-id-negative", cmpl(prompt=[-1])),
    Case("token-id-out-of-vocab", cmpl(prompt=[VOCAB])),
    Case("token-id-out-of-vocab-in-batch", cmpl(prompt=[[1, 2], [VOCAB]])),
    Case("token-id-beyond-int64", cmpl(prompt=[2**63])),
    Case("stop-token-id-negative", cmpl(stop_token_ids=[-1])),
    # --- seed ---
    Case("seed-2-pow-63", cmpl(seed=2**63)),
    Case("seed-below-int64", cmpl(seed=-(2**63) - 1)),
    Case("seed-2-pow-63-chat", chat(seed=2**63), CHAT),
    # --- logprobs ---
    Case("top-logprobs-21", chat(logprobs=True, top_logprobs=21), CHAT),
    Case("top-logprobs-negative", chat(logprobs=True, top_logprobs=-1), CHAT),
    Case("top-logprobs-without-logprobs", chat(top_logprobs=2), CHAT),
    Case("completions-logprobs-21", cmpl(logprobs=21)),
    Case("completions-logprobs-negative", cmpl(logprobs=-1)),
    # --- sampling ranges ---
    Case("temperature-negative", cmpl(temperature=-1)),
    Case("top-p-zero", cmpl(top_p=0)),
    Case("top-p-above-one", cmpl(top_p=1.5)),
    Case("top-k-zero", cmpl(top_k=0)),
    Case("top-k-below-minus-one", cmpl(top_k=-2)),
    Case("min-p-above-one", cmpl(min_p=1.5)),
    Case("presence-penalty-3", cmpl(presence_penalty=3)),
    Case("frequency-penalty-minus-3", cmpl(frequency_penalty=-3)),
    Case("presence-penalty-3-chat", chat(presence_penalty=3), CHAT),
    Case("repetition-penalty-zero", cmpl(repetition_penalty=0)),
    Case("min-tokens-negative", cmpl(min_tokens=-1)),
    Case("min-tokens-above-max-tokens", cmpl(min_tokens=5, max_tokens=1)),
    Case("temperature-negative-chat", chat(temperature=-1), CHAT),
    # --- stop strings ---
    Case("stop-empty-string", cmpl(stop="")),
    Case("stop-five-empty-strings", cmpl(stop=[""] * 5)),
    Case("stop-empty-string-chat", chat(stop=["x", ""]), CHAT),
    # --- OpenAI features twinfer does not support ---
    unsupported("suffix", COMPLETIONS, "suffix", cmpl(suffix="end")),
    Case("logit-bias-key-not-an-id", cmpl(logit_bias={"abc": 5}), mentions=("logit_bias",)),
    Case("logit-bias-out-of-vocab", cmpl(logit_bias={"999999": 5}), mentions=("vocabulary",)),
    Case("logit-bias-too-large-chat", chat(logit_bias={"1": 500}), CHAT, mentions=("100",)),
    unsupported("tools", CHAT, "tools", chat(tools=[TOOL])),
    unsupported("tool-choice", CHAT, "tool_choice", chat(tool_choice="auto")),
    unsupported("functions", CHAT, "functions", chat(functions=[TOOL["function"]])),
    unsupported("function-call", CHAT, "function_call", chat(function_call="auto")),
    unsupported(
        "response-format", CHAT, "response_format", chat(response_format={"type": "json_object"})
    ),
    unsupported("audio", CHAT, "audio", chat(audio={"voice": "alloy", "format": "wav"})),
    unsupported("modalities", CHAT, "modalities", chat(modalities=["text", "audio"])),
    unsupported("prediction", CHAT, "prediction", chat(prediction=PREDICTION)),
    Case(
        "image-content-part",
        chat(messages=user([{"type": "image_url", "image_url": {"url": "http://x/a.png"}}])),
        CHAT,
        mentions=("support",),
    ),
    unsupported(
        "structured-outputs",
        COMPLETIONS,
        "structured_outputs",
        cmpl(structured_outputs={"choice": ["a", "b"]}),
    ),  # fmt: skip
    unsupported("guided-json-chat", CHAT, "guided_json", chat(guided_json={"type": "object"})),
    unsupported("guided-choice-chat", CHAT, "guided_choice", chat(guided_choice=["a", "b"])),
    Case(
        "tool-call-arguments-not-json",
        chat(
            messages=[
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{x"},
                        }
                    ],
                },
            ]
        ),  # fmt: skip
        CHAT,
        mentions=("not valid JSON",),
    ),
    Case(
        "tool-call-without-function",
        chat(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]),
        CHAT,
        mentions=("a tool call must be",),
    ),
    Case("role-bogus", chat(messages=[{"role": "wizard", "content": "hi"}]), CHAT),
    Case("best-of-not-n", cmpl(best_of=2)),
    Case("best-of-zero", cmpl(best_of=0, n=_DROP)),
    Case("stream-options-without-stream", cmpl(stream_options={"include_usage": True})),
    Case(
        "stream-options-with-stream-false",
        cmpl(stream=False, stream_options={"include_usage": True}),
    ),
    Case("stream-options-without-stream-chat", chat(stream_options={"include_usage": True}), CHAT),
    # --- routes and methods ---
    Case("get-completions", None, COMPLETIONS, "GET", 405),
    Case("get-chat", None, CHAT, "GET", 405),
    Case("delete-models", None, "/v1/models", "DELETE", 405),
    Case("post-health", {}, "/health", "POST", 405),
    Case("unknown-route-post", cmpl(), "/v1/nope", status=404),
    Case("unknown-route-get", None, "/nope", "GET", 404),
    # --- /tokenize and /detokenize ---
    Case("detokenize-out-of-vocab", {"tokens": [VOCAB]}, "/detokenize"),
    Case("detokenize-negative", {"tokens": [-1]}, "/detokenize"),
    Case("detokenize-not-a-list", {"tokens": "x"}, "/detokenize"),
    Case("detokenize-missing-tokens", {}, "/detokenize"),
    Case("tokenize-nothing", {}, "/tokenize"),
    Case("tokenize-prompt-int", {"prompt": 5}, "/tokenize"),
    Case("tokenize-bogus-role", {"messages": [{"role": "wizard", "content": "x"}]}, "/tokenize"),
    Case("tokenize-malformed-json", b'{"prompt": ', "/tokenize"),
    Case(
        "tokenize-unknown-model",
        {"prompt": "hi", "model": "no-such-model"},
        "/tokenize",
        status=404,
        code="model_not_found",
    ),
]


def send(server: Server, case: Case):
    if case.body is None:
        return server.session.request(
            case.method, server.url + case.path, headers=server.headers(), timeout=30
        )
    if isinstance(case.body, Chunked):
        data = (case.body.data[i : i + 65536] for i in range(0, len(case.body.data), 65536))
    elif isinstance(case.body, bytes):
        data = case.body
    else:
        data = json.dumps(case.body).encode()
    headers = server.headers({"Content-Type": "application/json"})
    return server.session.request(
        case.method, server.url + case.path, data=data, headers=headers, timeout=30
    )


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(tiny_server: Server, case: Case) -> None:
    """The contract's status and error body for a bad request; the server stays healthy after."""
    r = send(tiny_server, case)
    assert r.status_code != 422 and r.status_code < 500, (r.status_code, r.text[:500])
    assert r.status_code == case.status, (r.status_code, r.text[:500])
    assert r.headers.get("content-type", "").split(";")[0].strip() == "application/json"
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if case.status == 400 or case.code == "model_not_found":
        assert error["type"] == "invalid_request_error", error
    if case.code is not None:
        assert error["code"] == case.code, error
    for word in case.mentions:
        assert word.lower() in error["message"].lower() or word == error["param"], (word, error)

    ok = tiny_server.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert isinstance(ok.json()["choices"][0]["text"], str)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, chat(messages=user("a\ud800b")), "messages.0.content"),
        (
            CHAT,
            chat(messages=user([{"type": "text", "text": "\udfff"}])),
            "messages.0.content.0.text",
        ),
        (COMPLETIONS, cmpl(prompt="a\ud800b"), "prompt"),
        (COMPLETIONS, cmpl(prompt=["ok", "x\udc00"]), "prompt.1"),
        (COMPLETIONS, cmpl(stop=["\ud83d"]), "stop.0"),
        (CHAT, chat(stop="\ud83d"), "stop"),
        ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
        ("/tokenize", {"messages": user("\ud800")}, "messages.0.content"),
    ],
)
def test_lone_surrogate_is_a_400_naming_the_field_and_the_connection_lives(
    tiny_server: Server, path: str, body: dict, param: str
) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text: a 400 that
    names the field (it was a 500 from the tokenizer that also broke the keep-alive connection)."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(tiny_server.url).netloc, timeout=30)
    headers = tiny_server.headers({"Content-Type": "application/json"})
    try:
        conn.request("POST", path, body=json.dumps(body), headers=headers)  # ASCII, \ud800 escaped
        r = conn.getresponse()
        error = json.loads(r.read())["error"]
        assert r.status == 400, error
        assert error["param"] == param and error["code"] == "invalid_text", error
        assert "not valid Unicode" in error["message"] and param in error["message"], error
        sock = conn.sock
        assert sock is not None, "the server closed the connection after the 400"
        conn.request("POST", COMPLETIONS, body=json.dumps(cmpl()), headers=headers)
        ok = conn.getresponse()
        assert ok.status == 200, ok.read()
        ok.read()
        assert conn.sock is sock  # the same keep-alive connection answered
    finally:
        conn.close()
