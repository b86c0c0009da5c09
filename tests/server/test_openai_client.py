"""The OpenAI API through the official `openai` client (sync and async).

What a user of `openai.OpenAI(base_url=...)` sees: the real model answers (the embedded default
model), streams join to the non-streamed text, n>1 indices, usage arithmetic, echo + logprobs,
batched prompts, stop strings, seeds, the documented fields, and the auxiliary routes (/v1/models,
/version, /tokenize, /detokenize). Where the text itself does not matter the tiny model runs.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import openai
import pytest

if TYPE_CHECKING:
    from conftest import Server

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "Count from one to twenty: one, two, three,"


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture
def tiny_client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0, timeout=120)


def tokenize(server: Server, text: str, add_special_tokens: bool = False) -> list[int]:
    r = server.post("/tokenize", json={"prompt": text, "add_special_tokens": add_special_tokens})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def detokenize(server: Server, tokens: list[int]) -> str:
    r = server.post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def check_usage(usage, max_tokens: int | None = None, finish_reasons=()) -> None:
    """prompt + completion == total; all finished by length ⇒ completion == n * max_tokens."""
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens >= 0
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens
    if max_tokens is not None and finish_reasons and set(finish_reasons) == {"length"}:
        assert usage.completion_tokens == max_tokens * len(finish_reasons)


# --- the real model answers -------------------------------------------------------------------


def test_readme_curl_body_answers_paris_without_sampling_flags(server: Server) -> None:
    """The README's curl example, byte for byte (no temperature): the embedded model's own
    defaults (greedy) answer with Paris, and a request's own temperature still applies."""
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    r = server.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    sampled = {**body, "temperature": 1.5, "seed": 3, "max_tokens": 8, "n": 4}
    texts = {
        c["message"]["content"]
        for c in server.post("/v1/chat/completions", json=sampled).json()["choices"]
    }
    assert len(texts) > 1  # the request's temperature, not the greedy default


def test_chat_answers_capital_of_france(server: Server, client: openai.OpenAI) -> None:
    """The embedded model, asked through chat at temperature 0, names Paris."""
    r = client.chat.completions.create(
        model=server.model, messages=CAPITAL, temperature=0, max_tokens=20
    )
    assert r.object == "chat.completion"
    assert r.model == server.model
    assert isinstance(r.created, int) and r.id
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    check_usage(r.usage, 20, [choice.finish_reason])


def test_chat_stream_joins_to_non_stream_text(server: Server, client: openai.OpenAI) -> None:
    """At temperature 0 the joined chat deltas are the non-streamed message, same finish."""
    kwargs = dict(model=server.model, messages=CAPITAL, temperature=0, max_tokens=12)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f is not None] == [full.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks)


def test_completion_stream_joins_to_non_stream_text(server: Server, client: openai.OpenAI) -> None:
    """At temperature 0 the joined completion chunks are the non-streamed text, same finish."""
    kwargs = dict(model=server.model, prompt=COUNTING, temperature=0, max_tokens=8)
    full = client.completions.create(**kwargs)
    assert full.object == "text_completion"
    assert full.id.startswith("cmpl-")
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f is not None] == [full.choices[0].finish_reason]
    check_usage(full.usage, 8, [full.choices[0].finish_reason])


def test_async_client_stream_and_non_stream(server: Server) -> None:
    """openai.AsyncOpenAI works, concurrent requests included (chat and completions)."""

    async def main() -> tuple[str, str, str, str]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="x", max_retries=0, timeout=120
        ) as ac:
            chat_kw = dict(model=server.model, messages=CAPITAL, temperature=0, max_tokens=20)
            cmpl_kw = dict(model=server.model, prompt=COUNTING, temperature=0, max_tokens=6)

            async def chat_stream() -> str:
                stream = await ac.chat.completions.create(**chat_kw, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            async def cmpl_stream() -> str:
                stream = await ac.completions.create(**cmpl_kw, stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])

            chat, streamed_chat, cmpl, streamed_cmpl = await asyncio.gather(
                ac.chat.completions.create(**chat_kw),
                chat_stream(),
                ac.completions.create(**cmpl_kw),
                cmpl_stream(),
            )
            texts = chat.choices[0].message.content, streamed_chat, cmpl.choices[0].text
            return (*texts, streamed_cmpl)

    chat, streamed_chat, cmpl, streamed_cmpl = asyncio.run(main())
    assert "Paris" in chat and "Paris" in streamed_chat
    assert cmpl and streamed_cmpl


# --- n, usage ---------------------------------------------------------------------------------


def test_n_gives_indices_and_usage(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """n samples come back with indices 0..n-1; prompt tokens count once, completions sum."""
    prompt_tokens = len(tokenize(tiny_server, COUNTING, add_special_tokens=True))
    r = tiny_client.completions.create(
        model=tiny_server.model,
        prompt=COUNTING,
        n=3,
        temperature=0.8,
        seed=7,
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert r.usage.prompt_tokens == prompt_tokens
    check_usage(r.usage, 4, [c.finish_reason for c in r.choices])

    chat = tiny_client.chat.completions.create(
        model=tiny_server.model, messages=CAPITAL, n=2, temperature=0.8, seed=7, max_tokens=4
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]
    assert all(c.message.role == "assistant" for c in chat.choices)
    check_usage(chat.usage, 4, [c.finish_reason for c in chat.choices])


def test_finish_length_means_max_tokens(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """finish_reason "length" ⇒ completion_tokens == max_tokens (chat and completions)."""
    r = tiny_client.completions.create(
        model=tiny_server.model, prompt=COUNTING, temperature=0, max_tokens=5,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    check_usage(r.usage)

    chat = tiny_client.chat.completions.create(
        model=tiny_server.model, messages=CAPITAL, temperature=0, max_completion_tokens=3
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 3
    check_usage(chat.usage)


def test_stream_include_usage(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """include_usage ends the stream with one usage chunk, equal to the non-streamed usage."""
    kwargs = dict(model=tiny_server.model, messages=CAPITAL, temperature=0, max_tokens=6)
    full = tiny_client.chat.completions.create(**kwargs)
    chunks = list(
        tiny_client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert [c for c in chunks if c.usage is not None] == [chunks[-1]]
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()

    kwargs = dict(model=tiny_server.model, prompt=COUNTING, temperature=0, max_tokens=4, n=2)
    full = tiny_client.completions.create(**kwargs)
    kwargs |= dict(stream=True, stream_options={"include_usage": True})
    chunks = list(tiny_client.completions.create(**kwargs))
    assert chunks[-1].choices == []
    assert [c for c in chunks if c.usage is not None] == [chunks[-1]]
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    check_usage(chunks[-1].usage)


# --- echo, logprobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_completion_echo_logprobs_on_token_ids(
    tiny_server: Server, tiny_client: openai.OpenAI, max_tokens: int
) -> None:
    """echo + logprobs on a token-id prompt: one entry per prompt token first, first one null."""
    ids = tokenize(tiny_server, "The capital of France is")
    prompt_text = detokenize(tiny_server, ids)
    r = tiny_client.completions.create(
        model=tiny_server.model,
        prompt=ids,
        echo=True,
        logprobs=1,
        max_tokens=max_tokens,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.text.startswith(prompt_text)
    lp = choice.logprobs
    n_out = r.usage.completion_tokens
    assert n_out == max_tokens
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == r.usage.total_tokens
    if max_tokens == 0:
        assert choice.text == prompt_text
    for field in (lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert len(field) == len(ids) + n_out
    # The prompt part corresponds one-to-one to the prompt tokens.
    for i, tok_id in enumerate(ids):
        assert lp.tokens[i] == detokenize(tiny_server, [tok_id]), i
    assert "".join(lp.tokens[: len(ids)]) == prompt_text
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    for value in lp.token_logprobs[1:]:
        assert isinstance(value, float) and value <= 0.0
    for top in lp.top_logprobs[1:]:
        assert isinstance(top, dict) and 1 <= len(top) <= 2
        assert all(v <= 0.0 for v in top.values())
    # text_offset: where each token starts in the returned text.
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]


def test_completion_logprobs_without_echo(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """logprobs=k: one entry per generated token, the greedy token is the top choice."""
    r = tiny_client.completions.create(
        model=tiny_server.model, prompt=COUNTING, logprobs=2, max_tokens=4, temperature=0
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == r.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert isinstance(value, float) and value <= 0.0
        assert 2 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(value, abs=1e-4)
        assert tok in top


def test_chat_logprobs_shapes(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """Chat logprobs: one content entry per token, top_logprobs of the asked size, greedy on top."""
    r = tiny_client.chat.completions.create(
        model=tiny_server.model,
        messages=CAPITAL,
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
    )
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(item.token for item in content) == choice.message.content
    for item in content:
        assert isinstance(item.logprob, float) and item.logprob <= 0.0
        if item.token.isascii():
            assert bytes(item.bytes) == item.token.encode()
        assert len(item.top_logprobs) == 3
        top = [t.logprob for t in item.top_logprobs]
        assert top == sorted(top, reverse=True)
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)

    r = tiny_client.chat.completions.create(
        model=tiny_server.model, messages=CAPITAL, max_tokens=2, logprobs=True
    )
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(item.top_logprobs == [] for item in r.choices[0].logprobs.content)


# --- batched prompts --------------------------------------------------------------------------


def test_batch_of_string_prompts(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """prompt=[str, str] with n=2: choice index = prompt_index * n + i; prompt tokens per prompt."""
    prompts = ["The sky is", "Once upon a time, in a small village"]
    counts = [len(tokenize(tiny_server, p, add_special_tokens=True)) for p in prompts]
    r = tiny_client.completions.create(
        model=tiny_server.model, prompt=prompts, n=2, echo=True, max_tokens=2,
        temperature=0.8, seed=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text.startswith(prompts[c.index // 2]), (c.index, c.text)
        assert c.finish_reason == "length"
    assert r.usage.prompt_tokens == sum(counts)
    assert r.usage.completion_tokens == 2 * 2 * 2
    check_usage(r.usage)


def test_batch_of_token_id_prompts(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """prompt=[[int], [int]]: one choice per prompt, in order."""
    texts = ["Hello there, my friend", "Paris is"]
    ids = [tokenize(tiny_server, t) for t in texts]
    r = tiny_client.completions.create(
        model=tiny_server.model, prompt=ids, echo=True, max_tokens=1, temperature=0
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert c.text.startswith(detokenize(tiny_server, ids[c.index]))
    assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    check_usage(r.usage)


# --- stop strings, seeds ----------------------------------------------------------------------


def _pick_stop(text: str) -> str:
    """A short piece from the middle of the text, not starting at position 0."""
    for start in range(len(text) // 3, len(text) - 2):
        piece = text[start : start + 3]
        if piece.strip():
            return piece
    pytest.fail(f"no stop string to pick from {text!r}")


def test_completion_stop_string(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """The text ends before the first stop string (finish "stop"), streamed or not."""
    # ignore_eos: an early end of sequence must not cut the text before the stop string.
    kwargs = dict(model=tiny_server.model, prompt=COUNTING, temperature=0, max_tokens=16)
    kwargs |= dict(extra_body={"ignore_eos": True})
    original = tiny_client.completions.create(**kwargs)
    text = original.choices[0].text
    stop = _pick_stop(text)
    expected = text[: text.index(stop)]

    r = tiny_client.completions.create(**kwargs, stop=[stop, "never-generated-zzz"])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra.get("stop_reason") == stop
    check_usage(r.usage)

    chunks = list(tiny_client.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    kwargs["extra_body"] = {"ignore_eos": True, "include_stop_str_in_output": True}
    kept = tiny_client.completions.create(**kwargs, stop=stop)
    assert kept.choices[0].text == expected + stop


def test_chat_stop_string(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """Chat: the message ends before the stop string, finish "stop"."""
    kwargs = dict(model=tiny_server.model, messages=CAPITAL, temperature=0, max_tokens=16)
    kwargs |= dict(extra_body={"ignore_eos": True})
    text = tiny_client.chat.completions.create(**kwargs).choices[0].message.content
    stop = _pick_stop(text)
    r = tiny_client.chat.completions.create(**kwargs, stop=stop)
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproduces_sampled_output(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """Same seed at temperature 1 gives the same text; different seeds give different texts."""
    kwargs = dict(model=tiny_server.model, prompt="My favourite animal is", temperature=1.0)
    kwargs |= dict(max_tokens=8, extra_body={"ignore_eos": True})
    first = tiny_client.completions.create(**kwargs, seed=1234).choices[0].text
    again = tiny_client.completions.create(**kwargs, seed=1234).choices[0].text
    assert first == again
    others = {tiny_client.completions.create(**kwargs, seed=s).choices[0].text for s in (1, 2, 3)}
    assert len(others | {first}) >= 2

    chat_kw = dict(model="tiny", messages=CAPITAL, temperature=1.0, max_tokens=8, seed=99)
    a = tiny_client.chat.completions.create(**chat_kw).choices[0].message.content
    b = tiny_client.chat.completions.create(**chat_kw).choices[0].message.content
    assert a == b


# --- auxiliary routes -------------------------------------------------------------------------


def test_models_and_version(server: Server, client: openai.OpenAI) -> None:
    """/v1/models lists the served model with its max_model_len; /version is the package's."""
    models = list(client.models.list())
    assert [m.id for m in models] == [server.model]
    assert models[0].object == "model"
    assert models[0].owned_by == "twinfer"
    assert isinstance(models[0].created, int)
    raw = server.get("/v1/models").json()
    assert raw["object"] == "list"
    entry = raw["data"][0]
    assert entry["max_model_len"] == 2048
    assert isinstance(entry["root"], str) and entry["root"]

    r = server.get("/version")
    assert r.status_code == 200
    assert r.json() == {"version": "0.1.0"}


def test_tokenize_detokenize_round_trip(server: Server, client: openai.OpenAI) -> None:
    """/tokenize then /detokenize gives the text back; counts match the completions usage."""
    text = "Hello, world! The capital of France is Paris. 1234 ünïcödé"
    r = server.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == 2048
    assert all(isinstance(t, int) for t in body["tokens"])
    assert detokenize(server, body["tokens"]) == text

    with_model = server.post("/tokenize", json={"prompt": text, "model": server.model})
    assert with_model.status_code == 200
    default = with_model.json()
    usage = client.completions.create(model=server.model, prompt=text, max_tokens=1).usage
    assert usage.prompt_tokens == default["count"]

    r = server.post("/detokenize", json={"tokens": body["tokens"], "model": server.model})
    assert r.status_code == 200 and r.json()["prompt"] == text


def test_tokenize_messages(server: Server, client: openai.OpenAI) -> None:
    """/tokenize with messages applies the chat template: same count as the chat usage."""
    r = server.post("/tokenize", json={"messages": CAPITAL, "add_generation_prompt": True})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"])
    assert "What is the capital of France?" in detokenize(server, body["tokens"])
    plain = tokenize(server, CAPITAL[0]["content"])
    assert body["count"] > len(plain)  # the template adds role markers
    usage = client.chat.completions.create(model=server.model, messages=CAPITAL, max_tokens=1).usage
    assert usage.prompt_tokens == body["count"]


# --- documented fields and bounds (tiny model: its text does not matter) ---------------------


def test_every_documented_completion_field_is_accepted(tiny_client: openai.OpenAI) -> None:
    """A request using every documented completions field (at valid values) succeeds."""
    r = tiny_client.completions.create(
        model="tiny",
        prompt="hello",
        max_tokens=4,
        temperature=0.7,
        top_p=0.9,
        n=2,
        best_of=2,
        stream=False,
        logprobs=20,
        echo=False,
        stop=["zzzz", "yyyy"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=2**63 - 1,
        user="someone",
        suffix=None,
        logit_bias=None,
        extra_body=dict(
            top_k=5,
            min_p=0.01,
            repetition_penalty=1.1,
            min_tokens=4,
            ignore_eos=False,
            stop_token_ids=[0],
            include_stop_str_in_output=False,
            skip_special_tokens=True,
            spaces_between_special_tokens=True,
        ),
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    # min_tokens == max_tokens: neither EOS nor stop_token_ids can end a choice early.
    assert r.usage.completion_tokens == 8
    for c in r.choices:
        assert c.finish_reason == "length"
        assert all(20 <= len(top) <= 21 for top in c.logprobs.top_logprobs)


TWO_PARTS = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]


def test_every_documented_chat_field_is_accepted(tiny_client: openai.OpenAI) -> None:
    """A chat request with every documented field and all message roles/forms succeeds."""
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": TWO_PARTS},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    r = tiny_client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=3,
        temperature=0.5,
        top_p=0.9,
        n=2,
        stop="zzzz",
        presence_penalty=1.0,
        frequency_penalty=1.0,
        logprobs=True,
        top_logprobs=20,
        seed=-(2**63),
        user="someone",
        extra_body=dict(
            top_k=3, min_p=0.0, repetition_penalty=1.0, min_tokens=3, ignore_eos=True,
            add_generation_prompt=True, skip_special_tokens=True,
        ),
    )  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 6
    for c in r.choices:
        assert c.finish_reason == "length"
        assert all(len(item.top_logprobs) == 20 for item in c.logprobs.content)


def test_text_parts_equal_string_content(tiny_client: openai.OpenAI) -> None:
    """Content as a one-element list of text parts is the same prompt as the plain string."""
    kwargs = dict(model="tiny", temperature=0, max_tokens=4)
    as_str = tiny_client.chat.completions.create(
        messages=[{"role": "user", "content": "Hello world"}], **kwargs
    )
    parts = [{"type": "text", "text": "Hello world"}]
    as_parts = tiny_client.chat.completions.create(
        messages=[{"role": "user", "content": parts}], **kwargs
    )
    assert as_parts.usage.prompt_tokens == as_str.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_str.choices[0].message.content


def test_default_max_tokens(tiny_server: Server, tiny_client: openai.OpenAI) -> None:
    """Completions default to 16 new tokens; chat defaults to the rest of max_model_len."""
    r = tiny_client.completions.create(
        model="tiny", prompt="hello", extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"

    # A prompt that leaves 8 tokens of the 256 (tiny_server's max_model_len) keeps this fast.
    def count(text: str) -> int:
        body = {"messages": [{"role": "user", "content": text}], "add_generation_prompt": True}
        return tiny_server.post("/tokenize", json=body).json()["count"]

    text = "hello" + " hello" * (256 - 8 - count("hello"))
    prompt_tokens = count(text)
    assert 200 < prompt_tokens < 256
    chat = tiny_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": text}],
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == prompt_tokens
    assert chat.usage.completion_tokens == 256 - prompt_tokens


def test_n_128_is_allowed(tiny_client: openai.OpenAI) -> None:
    """n may go up to 128: all indices come back."""
    r = tiny_client.completions.create(
        model="tiny", prompt="hi", n=128, max_tokens=1, temperature=1.0, seed=0
    )
    assert sorted(c.index for c in r.choices) == list(range(128))
    assert r.usage.completion_tokens == 128


def test_client_errors_carry_code_and_message(tiny_client: openai.OpenAI) -> None:
    """The openai package maps the error body to its exceptions, code and message included."""
    with pytest.raises(openai.BadRequestError) as exc:
        tiny_client.completions.create(model="tiny", prompt=[1] * 300, max_tokens=1)
    assert exc.value.status_code == 400
    assert exc.value.code == "context_length_exceeded"
    assert "300" in exc.value.message and "256" in exc.value.message

    with pytest.raises(openai.NotFoundError) as exc:
        tiny_client.chat.completions.create(model="no-such-model", messages=CAPITAL, max_tokens=1)
    assert exc.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as exc:
        tiny_client.chat.completions.create(model="tiny", messages=CAPITAL, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ])  # fmt: skip
    assert exc.value.type == "invalid_request_error"
