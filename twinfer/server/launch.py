"""`twinfer serve`: the API process (uvicorn) with the engine process behind it, and its shutdown.

SIGTERM drains: the server stops admitting (503 + Retry-After, /health 503), lets requests in
flight finish for up to --shutdown-timeout seconds, aborts the rest, then exits 0 with the engine
process gone. Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from types import FrameType

import uvicorn

from twinfer.config import EngineConfig, add_dataclass_args
from twinfer.engine.client import AsyncEngine, EngineDeadError
from twinfer.server.app import build_app
from twinfer.server.context import ServerConfig, ServerContext
from twinfer.server.metrics import Metrics

logger = logging.getLogger("twinfer.server")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_tag", nargs="?", default=None, help="The model (same as --model; default SmolLM2)."
    )
    parser.add_argument("--config", help="YAML file of flags (keys = flag names).")
    add_dataclass_args(parser, ServerConfig, "server")
    EngineConfig.add_cli_args(parser)


def server_config(args: argparse.Namespace) -> ServerConfig:
    values = {k: getattr(args, k) for k in ServerConfig.__dataclass_fields__}
    values["api_key"] = values["api_key"] or os.environ.get("TWINFER_API_KEY") or None
    config = ServerConfig(**values)
    if not 0 <= config.port <= 65535:
        raise ValueError(f"--port must be 0 to 65535, got {config.port}.")
    if config.max_request_body_bytes < 1:
        raise ValueError("--max-request-body-bytes must be at least 1.")
    if config.max_queued_requests < 0:
        raise ValueError("--max-queued-requests must be 0 or more.")
    if config.shutdown_timeout < 0:
        raise ValueError("--shutdown-timeout must be 0 or more seconds.")
    return config


def main(args: argparse.Namespace) -> int:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(
                f"two models given ({args.model_tag!r} and --model {args.model!r}); give one."
            )
        args.model = args.model_tag
    engine_config = EngineConfig.from_cli_args(args)
    config = server_config(args)
    engine = AsyncEngine(engine_config)  # reads the model's config: a bad model fails here
    return asyncio.run(_serve(engine, config))


async def _serve(engine: AsyncEngine, config: ServerConfig) -> int:
    metrics = Metrics(engine.model_name)
    engine.observer = metrics
    ctx = ServerContext(engine, metrics, config)
    app = build_app(ctx)
    uv_config = uvicorn.Config(
        app.state.asgi,
        host=config.host,
        port=config.port,
        access_log=not config.disable_uvicorn_access_log,
        timeout_graceful_shutdown=2,
        log_level="info",
    )
    server = DrainingServer(uv_config, ctx)
    logger.info("serving %s on http://%s:%d", engine.model_name, config.host, config.port)
    starting = asyncio.create_task(_start_engine(engine, server))
    try:
        await server.serve()
    finally:
        starting.cancel()
        await engine.shutdown()
    return 1 if server.failed_to_start else 0


async def _start_engine(engine: AsyncEngine, server: DrainingServer) -> None:
    """Start the engine; if it dies before it was ever ready, the server stops (exit 1)."""
    try:
        await engine.start()
    except Exception:
        logger.exception("the engine failed to start")
        server.fail()
        return
    while engine.ready is None or engine.outputs is None:
        if engine.dead_reason:
            logger.error("the engine failed to start: %s", engine.dead_reason)
            server.fail()
            return
        await asyncio.sleep(0.1)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServerContext) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.failed_to_start = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def fail(self) -> None:
        self.failed_to_start = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.ctx.draining or self._loop is None:
            return super().handle_exit(sig, frame)
        # NOTE: not recorded in _captured_signals, so uvicorn does not re-raise it: exit code 0.
        self.ctx.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        ctx = self.ctx
        timeout = ctx.config.shutdown_timeout
        logger.info(
            "SIGTERM: draining %d sequences for up to %.0f s", ctx.num_seqs_in_flight, timeout
        )
        deadline = time.monotonic() + timeout
        while ctx.num_seqs_in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if ctx.num_seqs_in_flight > 0:
            logger.warning(
                "shutdown timeout: aborting %d sequences still running", ctx.num_seqs_in_flight
            )
            ctx.engine.fail_all(EngineDeadError("the server shut down before this request ended"))
            await asyncio.sleep(0.2)  # let the handlers send their error and close
        self.should_exit = True
