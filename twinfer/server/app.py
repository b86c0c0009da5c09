"""The FastAPI app: the routes put together behind auth and body limits, and the small routes.

The way of a request: `auth.py` (key, body size) -> route in `completions.py` / `chat.py` ->
`ServerContext` in `context.py` (model check, tokenize off the loop, admit) -> `AsyncEngine`
(engine process) -> a `RequestGroup` streamed back as JSON or SSE. Routes import `context.py`,
`messages.py` and `streaming.py` below them; only this module imports the routes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from twinfer import __version__
from twinfer.server import chat, completions
from twinfer.server.auth import AuthMiddleware, BodyLimitMiddleware
from twinfer.server.context import ServerContext
from twinfer.server.errors import bad_request, install_error_handlers
from twinfer.server.messages import chat_messages
from twinfer.server.protocol import DetokenizeRequest, TokenizeRequest


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="twinfer", version=__version__)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(chat.router)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        state = "draining" if ctx.draining else ctx.engine.state.value
        if state == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": state}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": ctx.engine.model_name,
                    "object": "model",
                    "created": ctx.created,
                    "owned_by": "twinfer",
                    "root": str(ctx.engine.info.source.path),
                    "max_model_len": ctx.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        ctx.check_model(req.model)
        ctx.check_serving()
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            prompt = await ctx.chat_prompt(chat_messages(req.messages), req.add_generation_prompt)
            ids = prompt.prompt_token_ids
        else:
            tok = ctx.engine.tokenizer
            text = req.prompt
            ids = await asyncio.to_thread(
                lambda: list(tok.encode(text, add_special_tokens=req.add_special_tokens))
            )
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        ctx.check_model(req.model)
        ctx.check_serving()
        vocab = ctx.engine.info.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(
                f"token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})", param="tokens"
            )
        tok = ctx.engine.tokenizer
        return {"prompt": await asyncio.to_thread(tok.decode, req.tokens)}

    wrapped: Any = BodyLimitMiddleware(app, ctx.config.max_request_body_bytes)
    if ctx.config.api_key:
        wrapped = AuthMiddleware(wrapped, ctx.config.api_key)
    app.state.asgi = wrapped
    return app
