"""The engine core in its own process: receive requests, step, send outputs (ZMQ ipc + msgspec).

The loop blocks on its input socket only while the engine has nothing to do, so an idle server
costs no CPU and a busy one never waits on the API process. The process ends on a Shutdown
message, when its parent dies, or on an internal fault (reported as `EngineFailed` first).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import traceback

import msgspec
import zmq

from twinfer.config import EngineConfig
from twinfer.engine.core import EngineCore
from twinfer.engine.messages import (
    AbortRequests,
    AddRequests,
    ClientMessage,
    EngineFailed,
    EngineOutputs,
    EngineReady,
    SchedulerStats,
    Shutdown,
)
from twinfer.engine.request import Request

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 500  # how often an idle engine checks that its parent still lives


def run_engine_core(config_json: bytes, input_addr: str, output_addr: str, log_level: int) -> None:
    """Process entry point (spawned by `AsyncEngine`); the config travels as msgspec JSON."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    _die_with_parent()
    # NOTE: Ctrl-C reaches the whole process group; the API process decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(input_addr)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 1000)
    out.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        config = msgspec.json.decode(config_json, type=EngineConfig)
        from twinfer.loader.model_loader import model_info

        core = EngineCore.from_config(config, model_info(config))
        info = core.runner.info
        out.send(
            encoder.encode(
                EngineReady(
                    num_blocks=core.scheduler.kv_cache.num_blocks,
                    block_size=config.block_size,
                    max_model_len=info.max_model_len,
                    dtype=str(info.dtype).removeprefix("torch."),
                    device=str(info.device),
                    weight_bytes=info.weight_bytes,
                )
            )
        )
        EngineCoreLoop(core, inp, out, encoder, parent).run()
    except Exception as exc:  # noqa: BLE001 - any fault must reach the API process
        logger.error("engine core failed:\n%s", traceback.format_exc())
        out.send(encoder.encode(EngineFailed(f"{type(exc).__name__}: {exc}")))
    finally:
        inp.close(linger=0)
        out.close()
        ctx.term()


class EngineCoreLoop:
    def __init__(
        self,
        core: EngineCore,
        inp: zmq.Socket,
        out: zmq.Socket,
        encoder: msgspec.msgpack.Encoder,
        parent_pid: int,
    ) -> None:
        self.core = core
        self.inp = inp
        self.out = out
        self.encoder = encoder
        self.decoder = msgspec.msgpack.Decoder(ClientMessage)
        self.parent_pid = parent_pid

    def run(self) -> None:
        while True:
            busy = self.core.has_work()
            if self.inp.poll(0 if busy else _IDLE_POLL_MS):
                if not self._handle_messages():
                    return
            elif not busy and os.getppid() != self.parent_pid:
                logger.warning("API process is gone; engine core exits")
                return
            if self.core.has_work():
                outputs = self.core.step()
                self.out.send(self.encoder.encode(EngineOutputs(outputs, self.stats())))

    def _handle_messages(self) -> bool:
        """Apply every queued message; False on Shutdown. Stats go back after aborts."""
        changed = False
        while True:
            try:
                raw = self.inp.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = self.decoder.decode(raw)
            if isinstance(msg, Shutdown):
                return False
            if isinstance(msg, AddRequests):
                for r in msg.requests:
                    self.core.add_request(
                        Request(
                            r.request_id,
                            r.prompt_token_ids,
                            r.sampling_params,
                            frozenset(r.eos_token_ids),
                            r.max_tokens,
                            arrival_time=r.arrival_time,
                        )
                    )
            elif isinstance(msg, AbortRequests):
                self.core.abort_requests(msg.request_ids)
                changed = True
        if changed and not self.core.has_work():
            self.out.send(self.encoder.encode(EngineOutputs([], self.stats())))
        return True

    def stats(self) -> SchedulerStats:
        sched = self.core.scheduler
        kv = sched.kv_cache
        return SchedulerStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            num_preemptions=sched.num_preemptions,
        )


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the API process dies, so no engine is ever orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the parent-pid check in the loop covers it
