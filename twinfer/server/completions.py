"""POST /v1/completions: prompts (str, [str], [int], [[int]]) to text, as JSON or SSE.

Choice index = prompt index * n + sample index (OpenAI's rule). With `echo`, the prompt's text and
its logprobs (one entry per prompt token, the first null) come first, as lm-evaluation-harness
expects; `echo` with `max_tokens: 0` scores a prompt without generating.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from twinfer.engine.client import RequestGroup
from twinfer.engine.input_processor import ProcessedPrompt
from twinfer.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from twinfer.server.context import ServerContext, check_common, sampling_params_or_400
from twinfer.server.errors import bad_request
from twinfer.server.protocol import CompletionRequest
from twinfer.server.streaming import ChoiceTracker, ResponseHead, usage

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, raw: Request):
    ctx: ServerContext = raw.app.state.ctx
    ctx.check_model(req.model)
    _check_supported(req)
    ctx.check_serving()
    score_only = req.echo and req.max_tokens == 0
    max_tokens = 1 if score_only else req.max_tokens
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_logprobs = max(req.logprobs, prompt_logprobs or 0)
    params = sampling_params_or_400(
        lambda: req.sampling_params(
            ctx.engine.info.generation_defaults,
            max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    )
    prompts = req.prompts()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise bad_request("the prompt is empty; send text or at least one token id", "prompt")
    processed = await ctx.tokenize(prompts)
    for p in processed:
        ctx.check_length(p, max_tokens)
    group = ctx.admit(processed, params, "cmpl")
    view = _CompletionView(ctx, req, group, processed, score_only)
    return await ctx.respond(raw, group, view, req.stream)


def _check_supported(req: CompletionRequest) -> None:
    check_common(req)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported; remove best_of", "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens must be at least 1 (0 only with echo: true)", "max_tokens")


class _CompletionView:
    """Turns the group's RequestOutputs into completion JSON or SSE chunks."""

    def __init__(
        self,
        ctx: ServerContext,
        req: CompletionRequest,
        group: RequestGroup,
        prompts: list[ProcessedPrompt],
        score_only: bool,
    ) -> None:
        self.ctx = ctx
        self.req = req
        self.group = group
        self.prompts = prompts
        self.score_only = score_only
        self.head = ResponseHead(
            f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()), ctx.engine.model_name
        )
        self.decode = ctx.engine.tokenizer.decode

    def _prompt_index(self, out: RequestOutput) -> int:
        return self.group.request_ids.index(out.request_id)

    def _prompt_text(self, i: int) -> str:
        p = self.prompts[i]
        if p.prompt is not None:
            return p.prompt
        return self.decode(p.prompt_token_ids, skip_special_tokens=self.req.skip_special_tokens)

    def _generated(self, c: CompletionOutput) -> tuple[str, list[int], list | None]:
        if self.score_only:
            return "", [], [] if c.logprobs is not None else None
        return c.text, c.token_ids, c.logprobs

    async def collect(self) -> dict[str, Any]:
        final: dict[int, RequestOutput] = {}
        async for out in self.group:
            if out.finished:
                final[self._prompt_index(out)] = out
        choices, completion_tokens = [], 0
        for i in range(len(self.prompts)):
            out = final[i]
            for c in out.outputs:
                text, token_ids, logprobs = self._generated(c)
                completion_tokens += len(token_ids)
                lp = None
                if self.req.logprobs is not None:
                    lp = self._logprobs_json(out, token_ids, logprobs or [], echo=self.req.echo)
                if self.req.echo:
                    text = self._prompt_text(i) + text
                choices.append(
                    {
                        "index": i * self.req.n + c.index,
                        "text": text,
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
        prompt_tokens = sum(len(p.prompt_token_ids) for p in self.prompts)
        return self.head.body(choices, usage=usage(prompt_tokens, completion_tokens))

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        tracker = ChoiceTracker()
        completion_tokens = 0
        async for out in self.group:
            i = self._prompt_index(out)
            for c in out.outputs:
                index = i * self.req.n + c.index
                text, token_ids, logprobs = self._generated(c)
                delta = tracker.delta(index, text, token_ids, c.finish_reason)
                if delta is None:
                    continue
                first, delta_text, new_ids = delta
                completion_tokens += len(new_ids)
                lp = None
                if self.req.logprobs is not None:
                    new_lps = (logprobs or [])[len(token_ids) - len(new_ids) :]
                    lp = self._logprobs_json(out, new_ids, new_lps, echo=first and self.req.echo)
                if first and self.req.echo:
                    delta_text = self._prompt_text(i) + delta_text
                choice = {
                    "index": index,
                    "text": delta_text,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                yield self.head.body([choice], **extra)
        if include_usage:
            prompt_tokens = sum(len(p.prompt_token_ids) for p in self.prompts)
            yield self.head.body([], usage=usage(prompt_tokens, completion_tokens))

    def _logprobs_json(
        self,
        out: RequestOutput,
        token_ids: list[int],
        positions: list[PositionLogprobs],
        echo: bool,
    ) -> dict[str, Any]:
        """OpenAI's legacy logprobs object; with echo the prompt positions come first."""
        pairs: list[tuple[int, PositionLogprobs | None]] = []
        if echo:
            prompt_lps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            pairs.extend(zip(out.prompt_token_ids, prompt_lps, strict=True))
        pairs.extend(zip(token_ids, positions, strict=True))
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = 0
        for token_id, position in pairs:
            entry = position.get(token_id) if position else None
            text = entry.decoded_token if entry and entry.decoded_token is not None else None
            text = self.decode([token_id]) if text is None else text
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            token_logprobs.append(entry.logprob if entry else None)
            top_logprobs.append(
                {lp.decoded_token or "": lp.logprob for lp in position.values()}
                if position
                else None
            )
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
