"""Host-resident experts on the native CPU expert engine, called from MoELayer.

Shapes: `T` tokens, `H` hidden, `E` experts, `K` top-k, `I` expert inner size.

On a CUDA device a layer's call is a few stream operations: copies of hidden, top-k ids and
weights into pinned host buffers; the CPU step; a copy of the result back. The CPU step is
ordered on the stream either by stream signals (the stream writes a pinned word that the engine's
listener thread polls, and waits for its answer: a few microseconds) or by a host function (a
round trip through a CUDA driver thread woken by an interrupt: ~0.1 ms a layer on a VM; the
fallback where the driver lacks stream memory operations, or with TWINFER_CPU_EXPERT_SYNC=hostfn).
Both are stream operations, so eager steps and CUDA-graph replays run the same path and a whole
decode step, CPU experts included, replays as one graph. On the CPU the engine is called directly.
Without the native module, host experts run torch's reference backend (eager only).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from twinfer.hybrid.numa import WorkerPlan
from twinfer.layers.moe.backends import TorchExpertBackend
from twinfer.native import native_engine

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float8_e4m3fn: "fp8",  # weights only (fp8 layers, with their group scales)
}
GROUPED_FORMATS = ("int4", "int4z", "fp8")  # native formats with a scale per group of columns
# Thread pools are a process resource: engines with the same workers share one.
_POOLS: dict[tuple, Any] = {}
_BANDWIDTH_BYTES = 512 * 2**20


def dtype_name(t: Tensor) -> str:
    if t.dtype not in _DTYPE_NAMES:
        raise ValueError(f"the CPU expert engine does not take {t.dtype} tensors")
    return _DTYPE_NAMES[t.dtype]


def thread_pool(workers: WorkerPlan, spin_us: int) -> Any:
    key = (tuple(map(tuple, workers.cpus)), tuple(workers.nodes))
    if key not in _POOLS:
        _POOLS[key] = native_engine.ThreadPool(workers.cpus, workers.nodes, spin_us)
    pool = _POOLS[key]
    pool.spin_us = spin_us
    return pool


@dataclass(slots=True)
class _Staging:
    """Pinned host buffers the GPU copies into and out of (fixed addresses: graph-safe)."""

    hidden: Tensor  # [max_T, H]
    ids: Tensor  # [max_T, K]
    weights: Tensor  # [max_T, K]
    out: Tensor  # [max_T, H]

    def matches(self, hidden: Tensor, weights: Tensor, ids: Tensor) -> bool:
        return (
            (self.hidden.dtype, self.ids.dtype, self.weights.dtype)
            == (hidden.dtype, ids.dtype, weights.dtype)
            and self.hidden.shape[1] == hidden.shape[1]
            and self.ids.shape[1] == ids.shape[1]
        )


class CpuExpertEngine:
    """The CPU expert engine of one model: a pinned thread pool running its host expert layers,
    one layer at a time."""

    def __init__(self, workers: WorkerPlan, spin_us: int, max_tokens: int) -> None:
        self.workers = workers
        self.max_tokens = max_tokens
        self.pool = thread_pool(workers, spin_us) if native_engine is not None else None
        self.engine = native_engine.MoEEngine(self.pool) if self.pool is not None else None
        self.staging: _Staging | None = None
        self._gbps: float | None = None
        self.spin_us = spin_us
        self.signals: Tensor | None = None  # pinned [ready, ..., answered]: stream signals
        # Set by the GPU prefill streamer for the length of one long forward: its layers then
        # run on the GPU from streamed bytes (hybrid/gpu_prefill.py).
        self.stream_session: Any = None

    def __del__(self) -> None:
        # The native engine first: its listener thread polls `self.signals` until it is joined.
        self.engine = None

    @property
    def native(self) -> bool:
        return self.engine is not None

    def add_layer(
        self,
        w13: Tensor,
        w2: Tensor,
        fmt: str,
        group_size: int,
        group_scales: tuple[Tensor, Tensor] | None = None,
        group_offsets: tuple[Tensor, Tensor] | None = None,
    ) -> HostExperts:
        """w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I] in host memory, packed once
        into `fmt` (native format name: f32, bf16, f16, int8, int4, int4z, fp8) on the pool's
        NUMA nodes. Float weights are quantized to `fmt`; float8_e4m3fn weights (fmt "fp8" only)
        are kept as they are and need `group_scales`.

        `group_scales` (int4, int4z, fp8): per-row-per-group scales [E, 2I, H/g], [E, H, I/g]
        (g = group_size; a block-FP8 checkpoint's 128x128 block scales expanded to each row) of
        weights already on the format's grid, which then pack losslessly instead of being
        requantized: float w = q * s (+ m), fp8 w = v * s. `group_offsets` (int4z, with scales):
        the m of each group, same shapes (asymmetric int4: m = (8 - zero point) * s)."""
        grouped = fmt in GROUPED_FORMATS
        if (group_scales is not None or w13.dtype == torch.float8_e4m3fn) and not grouped:
            raise ValueError(
                f"group scales and fp8 weights are for the {', '.join(GROUPED_FORMATS)} formats, "
                f"not {fmt}"
            )
        if group_offsets is not None and (fmt != "int4z" or group_scales is None):
            raise ValueError("group offsets need the int4z format and group scales")
        if w13.dtype == torch.float8_e4m3fn and group_scales is None:
            raise ValueError(
                "fp8 expert weights need their group scales (group_scales=(s13, s2), f32 "
                f"[E, 2I, H/{group_size}] and [E, H, I/{group_size}])"
            )
        if self.engine is None:
            if w13.dtype == torch.float8_e4m3fn:  # NOTE: float copies for the torch backend
                w13, w2 = (
                    w.float() * s.float().repeat_interleave(group_size, -1)
                    for w, s in zip((w13, w2), group_scales, strict=True)
                )
            return HostExperts(self, -1, w13.shape[2], w13.contiguous(), w2.contiguous())
        e, two_i, h = w13.shape
        layer = native_engine.ExpertLayer(
            self.pool, e, h, two_i // 2, fmt, group_size if grouped else 0
        )
        w13, w2 = w13.contiguous(), w2.contiguous()
        keep: list[Tensor] = []  # float32 copies of the scales, alive until load_experts returns

        def per_group(pair: tuple[Tensor, Tensor] | None, what: str) -> list[list[int]]:
            if pair is None:
                return [[], []]
            shapes = ((e, two_i, h // group_size), (e, h, two_i // 2 // group_size))
            out = []
            for t, shape, name in zip(pair, shapes, ("w13", "w2"), strict=True):
                if tuple(t.shape) != shape:
                    raise ValueError(
                        f"{name} group {what} must be {list(shape)} (group size {group_size}), "
                        f"got {list(t.shape)}"
                    )
                out.append(t.to(torch.float32).contiguous())
            keep.extend(out)
            return [[t[x].data_ptr() for x in range(e)] for t in out]

        s13, s2 = per_group(group_scales, "scales")
        m13, m2 = per_group(group_offsets, "offsets")
        # One call: every worker packs the experts of its node's shard (first touch on the node).
        layer.load_experts(
            list(range(e)),
            [w13[x].data_ptr() for x in range(e)],
            [w2[x].data_ptr() for x in range(e)],
            dtype_name(w13),
            s13,
            s2,
            m13,
            m2,
        )
        return HostExperts(self, self.engine.add_layer(layer), h, layer=layer)

    def set_num_tokens(self, n: int) -> None:
        """Rows the next steps compute (a graph replay pads its batch; padded rows are skipped)."""
        if self.engine is not None:
            self.engine.set_num_tokens(n)

    def read_gbps(self) -> float | None:
        """DRAM read GB/s of this engine's threads (measured once; for the startup log)."""
        if self.pool is not None and self._gbps is None:
            self._gbps = native_engine.measure_read_bandwidth(self.pool, _BANDWIDTH_BYTES, 3)
        return self._gbps

    def staging_for(self, hidden: Tensor, weights: Tensor, ids: Tensor) -> _Staging:
        if self.staging is None or not self.staging.matches(hidden, weights, ids):
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("CPU expert staging buffers must exist before graph capture")
            rows, h, k = self.max_tokens, hidden.shape[1], ids.shape[1]

            def pinned(cols: int, dtype: torch.dtype) -> Tensor:
                # Normal tensors even when the first call runs under inference mode: graph
                # capture writes them outside it.
                with torch.inference_mode(False):
                    return torch.zeros(rows, cols, dtype=dtype, pin_memory=True)

            s = _Staging(
                pinned(h, hidden.dtype), pinned(k, ids.dtype), pinned(k, weights.dtype),
                pinned(h, hidden.dtype),
            )  # fmt: skip
            self.engine.bind_buffers(
                s.hidden.data_ptr(), dtype_name(s.hidden), s.ids.data_ptr(), dtype_name(s.ids),
                s.weights.data_ptr(), dtype_name(s.weights), s.out.data_ptr(), rows, k,
            )  # fmt: skip
            self.staging = s
            self._bind_signals()
        return self.staging

    def _bind_signals(self) -> None:
        if os.environ.get("TWINFER_CPU_EXPERT_SYNC", "signal") == "hostfn":
            return
        if self.signals is None and self.engine.signals_available():
            with torch.inference_mode(False):
                self.signals = torch.zeros(32, dtype=torch.int32, pin_memory=True)
            # Two cache lines: the stream's word and the listener's answer.
            self.engine.bind_signals(
                self.signals[0:].data_ptr(), self.signals[16:].data_ptr(), self.spin_us
            )

    def enqueue(self, stream: int, layer_id: int, num_tokens: int) -> None:
        """Order one layer's CPU step on `stream` (stream signals, else a host function)."""
        if self.signals is not None:
            try:
                self.engine.enqueue_signal(stream, layer_id, num_tokens)
                return
            except RuntimeError as exc:  # the first (eager) step finds out, before any capture
                logger.warning("stream signals unavailable (%s); using host functions", exc)
                self.signals = None
        self.engine.enqueue_run(stream, layer_id, num_tokens)


class HostExperts:
    """One MoE layer's routed experts in host RAM; `forward` has MoELayer's backend signature
    minus the weights."""

    def __init__(
        self,
        engine: CpuExpertEngine,
        layer_id: int,
        hidden_size: int,
        w13: Tensor | None = None,
        w2: Tensor | None = None,
        layer: Any = None,
    ) -> None:
        self.engine = engine
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.layer = layer  # the native ExpertLayer (keeps its packed bytes alive)
        self.w13, self.w2 = w13, w2  # torch fallback only

    @property
    def nbytes(self) -> int:
        if self.layer is not None:
            return int(self.layer.bytes)
        return self.w13.nbytes + self.w2.nbytes

    def forward(self, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        """hidden [T, H], topk_weights [T, K], topk_ids [T, K] -> [T, H] in hidden's dtype."""
        if self.engine.stream_session is not None:
            return self.engine.stream_session.forward(self, hidden, topk_weights, topk_ids)
        if self.layer is None:
            return self._forward_torch(hidden, topk_weights, topk_ids)
        t = hidden.shape[0]
        if t > self.engine.max_tokens:
            raise ValueError(
                f"a step of {t} tokens is more than the CPU expert engine's "
                f"{self.engine.max_tokens}-row buffers; keep --max-num-batched-tokens at most that"
            )
        if hidden.device.type == "cuda":
            return self._forward_cuda(hidden, topk_weights, topk_ids)
        hidden, topk_weights, topk_ids = (x.contiguous() for x in (hidden, topk_weights, topk_ids))
        out = torch.empty_like(hidden)
        self.engine.engine.forward(
            self.layer_id, hidden.data_ptr(), dtype_name(hidden), topk_ids.data_ptr(),
            dtype_name(topk_ids), topk_weights.data_ptr(), dtype_name(topk_weights),
            out.data_ptr(), t, topk_ids.shape[1],
        )  # fmt: skip
        return out

    def _forward_cuda(self, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        t = hidden.shape[0]
        s = self.engine.staging_for(hidden, topk_weights, topk_ids)
        s.hidden[:t].copy_(hidden, non_blocking=True)
        s.ids[:t].copy_(topk_ids, non_blocking=True)
        s.weights[:t].copy_(topk_weights, non_blocking=True)
        stream = torch.cuda.current_stream(hidden.device).cuda_stream
        # NOTE: start and wait as one stream operation: nothing runs on the GPU meanwhile (no
        # shared experts in the supported models). GPU work to overlap would go between the
        # native engine's enqueue and enqueue_wait. Only the stream waits, never this thread.
        self.engine.enqueue(stream, self.layer_id, t)
        out = torch.empty_like(hidden)
        out.copy_(s.out[:t], non_blocking=True)
        return out

    def _forward_torch(self, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        cpu = torch.device("cpu")
        if self.w13.dtype != hidden.dtype:  # e.g. fp8 experts' float32 copies: converted once
            self.w13, self.w2 = self.w13.to(hidden.dtype), self.w2.to(hidden.dtype)
        out = TorchExpertBackend().forward(
            hidden.to(cpu), topk_weights.to(cpu), topk_ids.to(cpu), self.w13, self.w2
        )
        return out.to(hidden.device)
