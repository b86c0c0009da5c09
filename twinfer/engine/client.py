"""AsyncEngine: the API process's side of the engine (tokenize, send, detokenize, stream back).

The engine core runs in its own process (`core_process.py`); this class spawns it, sends it
validated requests over ZMQ ipc, and turns its token outputs into `RequestOutput`s with the same
`OutputProcessor` the offline engine uses. Each API call gets a `RequestGroup` to iterate; closing
the group aborts whatever it still runs, which is how client disconnects free KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from twinfer.config import EngineConfig
from twinfer.engine.core_process import run_engine_core
from twinfer.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from twinfer.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreMessage,
    EngineCoreRequest,
    EngineFailed,
    EngineOutputs,
    EngineReady,
    SchedulerStats,
    Shutdown,
)
from twinfer.engine.output_processor import OutputProcessor
from twinfer.loader.model_loader import load_tokenizer, model_info
from twinfer.outputs import RequestOutput
from twinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DEAD = "dead"


class EngineDeadError(RuntimeError):
    """The engine process is gone; requests in flight cannot finish."""


class RequestGroup:
    """The outputs of one API call (one or more engine requests), in arrival order."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], num_seqs: int) -> None:
        self.engine = engine
        self.request_ids = request_ids
        self.num_seqs = num_seqs  # engine sequences: prompts x n
        self.pending = set(request_ids)
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.closed = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self.pending:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.pending.discard(item.request_id)
            yield item

    def close(self) -> bool:
        """Abort what is still running; True the first time (call it in a `finally`)."""
        if self.closed:
            return False
        self.closed = True
        if self.pending:
            self.engine.abort(list(self.pending))
            self.pending.clear()
        return True


class EngineObserver(Protocol):
    """What watches the engine (the server's metrics)."""

    def on_arrival(self, request_id: str) -> None: ...
    def on_forget(self, request_id: str) -> None: ...
    def on_stats(self, stats: SchedulerStats) -> None: ...
    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...


class AsyncEngine:
    """Owns the engine process and routes its outputs to the `RequestGroup`s waiting on them."""

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None) -> None:
        self.config = config
        self.info = model_info(config)  # reads the config only: bad flags fail here, fast
        self.tokenizer: Any = None  # loaded in start(), while the engine process loads weights
        self.inputs: InputProcessor | None = None
        self.outputs: OutputProcessor | None = None
        self.observer = observer
        self.state = EngineState.LOADING
        self.dead_reason = ""
        self.ready: EngineReady | None = None
        self.stats = SchedulerStats()
        self.groups: dict[str, RequestGroup] = {}  # user request id -> its group
        self.proc: multiprocessing.Process | None = None
        self._ipc_dir = tempfile.TemporaryDirectory(prefix="twinfer-")
        # Sends are synchronous (a PUSH socket queues locally); receives are awaited.
        self._sync_ctx = zmq.Context()
        self._ctx = zmq.asyncio.Context()
        self._input = self._sync_ctx.socket(zmq.PUSH)
        self._output = self._ctx.socket(zmq.PULL)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.info.source.name

    # ---- lifecycle ----
    async def start(self) -> None:
        """Spawn the engine process and wait (without blocking the loop) until it is ready."""
        base = Path(self._ipc_dir.name)
        input_addr, output_addr = f"ipc://{base}/input", f"ipc://{base}/output"
        self._input.bind(input_addr)
        self._output.bind(output_addr)
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(
            target=run_engine_core,
            args=(
                msgspec.json.encode(self.config),
                input_addr,
                output_addr,
                logging.getLogger("twinfer").getEffectiveLevel(),
            ),
            name="twinfer-engine-core",
            daemon=True,
        )
        self.proc.start()
        logger.info("engine core process started (pid %d)", self.proc.pid)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.config, self.info.source)
        self.inputs = InputProcessor(self.tokenizer, self.info, self.config.max_logprobs)
        self.outputs = OutputProcessor(self.tokenizer)
        self._maybe_ready()
        self._tasks = [
            asyncio.create_task(self._output_loop(), name="engine-outputs"),
            asyncio.create_task(self._watch_process(), name="engine-watchdog"),
        ]

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process (politely, then by force) and close the sockets."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self.proc is not None and self.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self._input.send(self._encoder.encode(Shutdown()), zmq.NOBLOCK)
            deadline = time.monotonic() + timeout
            while self.proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5)
        self.fail_all(EngineDeadError("the server is shutting down"))
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        self._sync_ctx.term()
        self._ipc_dir.cleanup()

    async def _watch_process(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self.proc is not None and not self.proc.is_alive() and not self._closing:
                self._die(f"the engine process exited (code {self.proc.exitcode})")
                return

    def _die(self, reason: str) -> None:
        if self.state is EngineState.DEAD:
            return
        logger.error("engine is dead: %s", reason)
        self.state, self.dead_reason = EngineState.DEAD, reason
        self.fail_all(EngineDeadError(f"{reason}; the server cannot run requests any more"))

    def fail_all(self, exc: BaseException) -> None:
        """End every request in flight with `exc` (engine death, shutdown timeout)."""
        groups = set(self.groups.values())
        if self.outputs is not None:
            self.abort(list(self.groups))
        for group in groups:
            group.queue.put_nowait(exc)
        self.groups.clear()

    async def _output_loop(self) -> None:
        while True:
            msg = self._decoder.decode(await self._output.recv())
            if isinstance(msg, EngineOutputs):
                self._process(msg)
            elif isinstance(msg, EngineReady):
                self.ready = msg
                self._log_ready(msg)
                self._maybe_ready()
            elif isinstance(msg, EngineFailed):
                self._die(f"the engine failed: {msg.message}")
                return

    def _maybe_ready(self) -> None:
        """Ready once the engine process has loaded and this side has its tokenizer."""
        if self.state is EngineState.LOADING and self.ready and self.outputs is not None:
            self.state = EngineState.READY

    def _process(self, msg: EngineOutputs) -> None:
        self.stats = msg.stats
        outputs, stopped = self.outputs.process_outputs(msg.outputs)
        if stopped:  # stop strings found here end engine requests there
            self._send(AbortRequests(stopped))
        for out in outputs:
            group = self.groups.get(out.request_id)
            if group is not None:
                group.queue.put_nowait(out)
                if out.finished:
                    del self.groups[out.request_id]
        if self.observer is not None:
            self.observer.on_stats(msg.stats)
            self.observer.on_outputs(outputs, time.monotonic())

    def _log_ready(self, ready: EngineReady) -> None:
        # NOTE: the KV cache line comes from the engine process (the runner sizes the cache).
        logger.info(
            "model %s ready: dtype %s, device %s, weights %.2f GiB, max_model_len %d",
            self.model_name,
            ready.dtype,
            ready.device,
            ready.weight_bytes / 2**30,
            ready.max_model_len,
        )
        logger.info("sampling defaults: %s", self.info.describe_sampling_defaults())

    # ---- requests ----
    def tokenize(self, prompt: PromptType) -> ProcessedPrompt:
        """Blocking (tokenizer work): call it through `asyncio.to_thread`."""
        return self.inputs.tokenize(prompt)

    def add_requests(
        self, prompts: list[ProcessedPrompt], params: SamplingParams, prefix: str
    ) -> RequestGroup:
        """Validate every prompt, then send them all; raises ValueError before sending anything."""
        if self.state is not EngineState.READY:
            raise EngineDeadError(self.dead_reason or "the engine is still loading")
        ids = [f"{prefix}-{i}-{uuid.uuid4().hex[:8]}" for i in range(len(prompts))]
        engine_requests = [
            self.inputs.make_requests(rid, p, params) for rid, p in zip(ids, prompts, strict=True)
        ]
        group = RequestGroup(self, ids, sum(len(r) for r in engine_requests))
        now = time.monotonic()
        wire: list[EngineCoreRequest] = []
        for rid, prompt, reqs in zip(ids, prompts, engine_requests, strict=True):
            self.outputs.add_request(rid, prompt.prompt, prompt.prompt_token_ids, params, reqs)
            self.groups[rid] = group
            if self.observer is not None:
                self.observer.on_arrival(rid)
            wire.extend(
                EngineCoreRequest(
                    r.request_id,
                    r.prompt_token_ids,
                    r.sampling_params,
                    sorted(r.eos_token_ids),
                    r.max_tokens,
                    now,
                )
                for r in reqs
            )
        self._send(AddRequests(wire))
        return group

    def abort(self, request_ids: list[str]) -> None:
        engine_ids: list[str] = []
        for rid in request_ids:
            self.groups.pop(rid, None)
            if self.observer is not None:
                self.observer.on_forget(rid)
            engine_ids.extend(self.outputs.abort_request(rid))
        if engine_ids and self.state is EngineState.READY:
            self._send(AbortRequests(engine_ids))

    def _send(self, msg: Any) -> None:
        # NOTE: a PUSH socket queues locally, so this never waits on the engine process.
        self._input.send(self._encoder.encode(msg), zmq.NOBLOCK)
