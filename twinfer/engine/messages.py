"""Messages between the API process and the engine core process (msgspec over ZMQ ipc).

Every message is a typed msgspec struct in a tagged union, so both sides decode exactly the
shapes they expect and nothing is ever unpickled from a socket.
"""

from __future__ import annotations

import msgspec

from twinfer.engine.scheduler import EngineCoreOutput
from twinfer.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One engine sequence, already tokenized and validated by the API process."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    max_tokens: int
    arrival_time: float


# ---- API process -> engine core ----
class AddRequests(msgspec.Struct, tag="add"):
    requests: list[EngineCoreRequest]


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


ClientMessage = AddRequests | AbortRequests | Shutdown


# ---- engine core -> API process ----
class SchedulerStats(msgspec.Struct):
    """The engine's state after a step; counters are cumulative since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


class EngineReady(msgspec.Struct, tag="ready"):
    """Sent once the model is loaded and the KV cache allocated."""

    num_blocks: int
    block_size: int
    max_model_len: int
    dtype: str
    device: str
    weight_bytes: int


class EngineOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats


class EngineFailed(msgspec.Struct, tag="failed"):
    """The engine hit an internal fault and stops; every live request must get an error."""

    message: str


CoreMessage = EngineReady | EngineOutputs | EngineFailed
