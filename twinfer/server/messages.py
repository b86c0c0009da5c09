"""Chat messages as the model's chat template takes them (the chat route and /tokenize)."""

from __future__ import annotations

import json
from typing import Any

from twinfer.server.errors import bad_request
from twinfer.server.protocol import ChatMessage


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: text content, `developer` read as `system`;
    `name`, an assistant's `tool_calls` (their JSON `arguments` as objects, as HF templates
    iterate them) and a tool message's `tool_call_id` passed on for the template to render."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text":
                    raise bad_request(
                        f"messages.{i}: content parts of type {part.get('type')!r} are not "
                        "supported by twinfer yet; send text parts only",
                        f"messages.{i}.content",
                        "unsupported_parameter",
                    )
                if not isinstance(part.get("text"), str):
                    raise bad_request(
                        f'messages.{i}: a text part must be {{"type": "text", "text": "..."}}',
                        f"messages.{i}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": content or "",
        }
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [_tool_call(call, f"messages.{i}") for call in m.tool_calls]
        out.append(message)
    return out


def _tool_call(call: dict[str, Any], where: str) -> dict[str, Any]:
    """An OpenAI tool call with its `arguments` JSON string parsed (a 400 naming it if broken)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(
            f'{where}: a tool call must be {{"type": "function", "function": {{"name": ..., '
            '"arguments": "{...}"}}',
            f"{where}.tool_calls",
        )
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            raise bad_request(
                f"{where}: tool call arguments are not valid JSON ({exc.msg})",
                f"{where}.tool_calls",
            ) from None
    return {**call, "function": {**function, "arguments": arguments}}
