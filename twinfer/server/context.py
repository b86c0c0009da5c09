"""What every route shares: the server's configuration, `ServerContext` (model check, admission,
tokenization off the event loop) and the checks both completion routes make.

Routes (`completions.py`, `chat.py`, the small ones in `app.py`) import from here; nothing here
imports a route.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from twinfer.engine.client import AsyncEngine, EngineDeadError, EngineState, RequestGroup
from twinfer.engine.input_processor import ProcessedPrompt, PromptType
from twinfer.sampling_params import SamplingParams
from twinfer.server.errors import (
    APIError,
    bad_request,
    error_response,
    unavailable,
)
from twinfer.server.metrics import Metrics
from twinfer.server.streaming import sse_events

T = TypeVar("T")


@dataclass(slots=True)
class ServerConfig:
    """Settings of the API process (the engine's are in EngineConfig)."""

    host: str = field(default="0.0.0.0", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on (0 to 65535)."})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "Bearer token every route but /health requires (default: $TWINFER_API_KEY; "
            "none: open)."
        },
    )
    max_request_body_bytes: int = field(
        default=2**20, metadata={"help": "Larger request bodies are refused with 413."}
    )
    max_queued_requests: int = field(
        default=1024,
        metadata={
            "help": "Sequences that may wait beyond --max-num-seqs; more are refused with 503 "
            "and Retry-After."
        },
    )
    shutdown_timeout: float = field(
        default=30.0,
        metadata={
            "help": "On SIGTERM, seconds requests in flight get to finish before they are aborted."
        },
    )
    disable_uvicorn_access_log: bool = field(
        default=False, metadata={"help": "Do not log one line per HTTP request."}
    )


class ServerContext:
    """State shared by the routes: the engine, metrics, admission counters, draining."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics, config: ServerConfig) -> None:
        self.engine = engine
        self.metrics = metrics
        self.config = config
        self.draining = False
        self.num_seqs_in_flight = 0
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.engine.model_name!r} "
                "(see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def check_serving(self) -> None:
        if self.draining:
            raise unavailable(
                "the server is shutting down; retry on another one", "server_draining"
            )
        if self.engine.state is EngineState.DEAD:
            raise unavailable(f"the engine is dead: {self.engine.dead_reason}", "engine_dead")
        if self.engine.state is EngineState.LOADING:
            raise unavailable("the model is still loading; retry shortly", "model_loading")

    async def tokenize(self, prompts: list[PromptType]) -> list[ProcessedPrompt]:
        """Tokenize off the event loop; a bad prompt is a 400."""
        try:
            return await asyncio.to_thread(lambda: [self.engine.tokenize(p) for p in prompts])
        except ValueError as exc:
            raise bad_request(str(exc), param="prompt") from exc

    async def chat_prompt(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool
    ) -> ProcessedPrompt:
        """The chat template applied off the event loop; a template's refusal is a 400."""
        try:
            return await asyncio.to_thread(
                render_chat, self.engine, messages, add_generation_prompt
            )
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from exc
        except Exception as exc:  # jinja's TemplateError: e.g. roles must alternate
            if "Template" not in type(exc).__name__:
                raise
            raise bad_request(
                f"the chat template refused the messages: {exc}", param="messages"
            ) from exc

    def check_length(self, prompt: ProcessedPrompt, max_tokens: int | None) -> None:
        n, limit = len(prompt.prompt_token_ids), self.max_model_len
        if max_tokens is not None and n + max_tokens > limit:
            raise bad_request(
                f"this model's max_model_len is {limit} tokens, but the request asks for "
                f"{n + max_tokens} ({n} in the prompt + {max_tokens} max_tokens); lower "
                f"max_tokens to at most {max(limit - n, 0)} or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if n >= limit:
            raise bad_request(
                f"this model's max_model_len is {limit} tokens, but the prompt has {n} (room is "
                "needed for at least one generated token); shorten the prompt",
                param="messages" if prompt.prompt is None else "prompt",
                code="context_length_exceeded",
            )

    def admit(
        self, prompts: list[ProcessedPrompt], params: SamplingParams, prefix: str
    ) -> RequestGroup:
        """Enqueue the prompts as one group or refuse: 400 bad input, 503 full or not serving."""
        self.check_serving()
        wanted = len(prompts) * params.n
        limit = self.engine.config.max_num_seqs + self.config.max_queued_requests
        if self.num_seqs_in_flight + wanted > limit:
            raise unavailable(
                f"the server is full ({self.num_seqs_in_flight} sequences running or queued, "
                f"limit {limit}); retry later",
                "server_overloaded",
            )
        try:
            group = self.engine.add_requests(prompts, params, prefix)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        except EngineDeadError as exc:
            raise unavailable(str(exc), "engine_dead") from exc
        self.num_seqs_in_flight += group.num_seqs
        return group

    def release(self, group: RequestGroup) -> None:
        if group.close():
            self.num_seqs_in_flight -= group.num_seqs

    async def respond(self, raw: Request, group: RequestGroup, view: Any, stream: bool) -> Response:
        """The view's JSON, or its chunks as SSE; the group is released however it ends."""
        if stream:
            chunks = sse_events(view.chunks(), lambda: self.release(group))
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            body = await self.until_disconnect(raw, view.collect())
        except EngineDeadError as exc:
            return error_response(unavailable(str(exc), "engine_dead"))
        finally:
            self.release(group)
        return JSONResponse(body)

    async def until_disconnect(self, raw: Request, work: Awaitable[T]) -> T | None:
        """Run `work`, cancelled (None) if the client goes away first: its requests get aborted."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_wait_disconnect(raw))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None


async def _wait_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def check_common(req: Any) -> None:
    """Checks both completion endpoints make: unimplemented parameters, stream_options."""
    name = req.unsupported()
    if name is not None:
        raise bad_request(
            f"{name} is not supported by twinfer yet; remove it", name, "unsupported_parameter"
        )
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")


def sampling_params_or_400(build: Any) -> SamplingParams:
    """Build SamplingParams; its ValueError (which names the field first) becomes a 400."""
    try:
        return build()
    except ValueError as exc:
        message = str(exc)
        param = message.split(" ", 1)[0]
        raise bad_request(message, param=param if param.isidentifier() else None) from exc


def render_chat(engine: AsyncEngine, messages: list[dict[str, Any]], add_generation_prompt: bool):
    """The chat template applied to messages (blocking: call through asyncio.to_thread)."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {engine.model_name} has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return ProcessedPrompt(text, list(tokenizer.encode(text, add_special_tokens=False)))
