"""POST /v1/chat/completions: messages through the model's chat template, as JSON or SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from twinfer.engine.client import RequestGroup
from twinfer.outputs import PositionLogprobs
from twinfer.server.context import ServerContext, check_common, sampling_params_or_400
from twinfer.server.errors import bad_request
from twinfer.server.messages import chat_messages
from twinfer.server.protocol import ChatCompletionRequest
from twinfer.server.streaming import ChoiceTracker, ResponseHead, usage

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, raw: Request):
    ctx: ServerContext = raw.app.state.ctx
    ctx.check_model(req.model)
    _check_supported(req)
    ctx.check_serving()
    max_tokens = req.max_completion_tokens or req.max_tokens
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params_or_400(
        lambda: req.sampling_params(ctx.engine.info.generation_defaults, max_tokens, logprobs=top)
    )
    prompt = await ctx.chat_prompt(chat_messages(req.messages), req.add_generation_prompt)
    ctx.check_length(prompt, max_tokens)
    group = ctx.admit([prompt], params, "chatcmpl")
    view = _ChatView(ctx, req, group, len(prompt.prompt_token_ids))
    return await ctx.respond(raw, group, view, req.stream)


def _check_supported(req: ChatCompletionRequest) -> None:
    check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")


class _ChatView:
    def __init__(
        self, ctx: ServerContext, req: ChatCompletionRequest, group: RequestGroup, n_prompt: int
    ) -> None:
        self.ctx = ctx
        self.req = req
        self.group = group
        self.prompt_tokens = n_prompt
        rid, now, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ctx.engine.model_name
        self.head = ResponseHead(rid, "chat.completion", now, model)
        self.chunk_head = ResponseHead(rid, "chat.completion.chunk", now, model)

    async def collect(self) -> dict[str, Any]:
        final = None
        async for out in self.group:
            final = out
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs_json(c.token_ids, c.logprobs),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in final.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return self.head.body(choices, usage=usage(self.prompt_tokens, completion_tokens))

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        head = self.chunk_head
        tracker = ChoiceTracker()
        completion_tokens = 0
        for i in range(self.req.n):
            role = {"index": i, "delta": {"role": "assistant", "content": ""}}
            yield head.body([role | _NO_FINISH], **extra)
        async for out in self.group:
            for c in out.outputs:
                delta = tracker.delta(c.index, c.text, c.token_ids, c.finish_reason)
                if delta is None:
                    continue
                _, text, new_ids = delta
                completion_tokens += len(new_ids)
                new_lps = (c.logprobs or [])[len(c.token_ids) - len(new_ids) :]
                choice = {
                    "index": c.index,
                    "delta": {"content": text} if text else {},
                    "logprobs": self._logprobs_json(new_ids, new_lps),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                yield head.body([choice], **extra)
        if include_usage:
            yield head.body([], usage=usage(self.prompt_tokens, completion_tokens))

    def _logprobs_json(
        self, token_ids: list[int], positions: list[PositionLogprobs] | None
    ) -> dict[str, Any] | None:
        if not self.req.logprobs or positions is None:
            return None
        k = self.req.top_logprobs or 0
        content = []
        for token_id, position in zip(token_ids, positions, strict=True):
            chosen = position[token_id]
            ranked = sorted(
                (lp for lp in position.values() if lp.rank is not None and lp.rank <= k),
                key=lambda lp: lp.rank,
            )[:k]
            content.append(
                _token_logprob(chosen.decoded_token, chosen.logprob)
                | {"top_logprobs": [_token_logprob(lp.decoded_token, lp.logprob) for lp in ranked]}
            )
        return {"content": content}


_NO_FINISH = {"logprobs": None, "finish_reason": None}


def _token_logprob(token: str | None, logprob: float) -> dict[str, Any]:
    token = token or ""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
