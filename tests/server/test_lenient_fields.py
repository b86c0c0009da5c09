"""What agent frameworks send passes through: unknown fields are ignored with one warning per
field name (vLLM's behaviour), developer/tool roles, tool calls in the history, and OpenAI fields
that only hint (`parallel_tool_calls`, `reasoning_effort`) are accepted."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def test_unknown_fields_are_ignored_with_one_warning_each(tiny_server: Server) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi", "bogus_part_field": 1}],
        "max_tokens": 2,
        "store": False,  # newer OpenAI fields, as the openai SDK and agents send them
        "metadata": {"run": "x"},
        "bogus_field_zz": {"nested": [1, 2]},
    }
    for _ in range(2):
        r = tiny_server.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
    r = tiny_server.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1, "bogus_field_zz": 1})
    assert r.status_code == 200, r.text
    log = tiny_server.log()
    warned = "ignoring unknown request field ChatCompletionRequest.bogus_field_zz (logged once)"
    assert log.count(warned) == 1  # two requests, one warning
    assert "ChatMessage.bogus_part_field" in log
    assert "CompletionRequest.bogus_field_zz" in log


def test_agent_history_with_tool_calls_passes_through(tiny_server: Server) -> None:
    """An agent loop's second turn: the assistant's tool call (content null) and the tool's
    answer go to the chat template; hint-only fields are accepted."""
    body = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }]},
            {"role": "tool", "tool_call_id": "call_1",
             "content": [{"type": "text", "text": "sunny"}]},
            {"role": "user", "content": "Thanks", "name": "alice"},
        ],
        "max_completion_tokens": 2,
        "parallel_tool_calls": True,
        "reasoning_effort": "low",
        "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    r = tiny_server.post(CHAT, json=body, stream=True)
    assert r.status_code == 200, r.text
    events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    tiny_server.wait_idle()


def test_logit_bias_forces_and_bans_tokens(tiny_server: Server) -> None:
    """+100 on one token makes greedy decoding pick it every step; the same request with the
    bias on the chat route too."""
    forced = 100
    text = tiny_server.post("/detokenize", json={"tokens": [forced] * 3}).json()["prompt"]
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0, "logit_bias": {str(forced): 100}}
    r = tiny_server.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text
    chat_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                 "temperature": 0, "logit_bias": {str(forced): 100}}  # fmt: skip
    r = tiny_server.post(CHAT, json=chat_body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == text
