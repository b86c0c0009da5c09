"""Server-sent events, OpenAI's way: `data: {json}\\n\\n` chunks, then `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from twinfer.engine.client import EngineDeadError
from twinfer.server.errors import sse_error, unavailable

DONE = "data: [DONE]\n\n"


def sse(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


@dataclass(slots=True)
class ResponseHead:
    """What every chunk (and the JSON body) of one response repeats."""

    id: str
    object: str
    created: int
    model: str

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        head = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        return head | {"choices": choices} | extra


async def sse_events(
    chunks: AsyncIterator[dict[str, Any]], release: Callable[[], None]
) -> AsyncIterator[str]:
    """One response's SSE: its chunks, an error event if the engine died, then [DONE].

    `release` runs however the stream ends, a client disconnect included (it aborts what runs).
    """
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except EngineDeadError as exc:
        yield sse_error(unavailable(str(exc), "engine_dead"))
    finally:
        release()
    yield DONE


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ChoiceTracker:
    """What each choice has been sent, so every chunk carries only what is new.

    A choice gets exactly one chunk with its finish_reason, and nothing after it.
    """

    def __init__(self) -> None:
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def delta(
        self, index: int, text: str, token_ids: list[int], finish_reason: str | None
    ) -> tuple[bool, str, list[int]] | None:
        """(first chunk of this choice?, new text, new token ids), or None if nothing to send."""
        if index in self.finished:
            return None
        first = index not in self.sent_text
        sent_text = self.sent_text.get(index, 0)
        sent_tokens = self.sent_tokens.get(index, 0)
        new_text, new_ids = text[sent_text:], token_ids[sent_tokens:]
        if not new_text and not new_ids and finish_reason is None:
            return None
        self.sent_text[index], self.sent_tokens[index] = len(text), len(token_ids)
        if finish_reason is not None:
            self.finished.add(index)
        return first, new_text, new_ids
