"""GPU prefill streaming: a long forward copies host-resident experts to the GPU layer by layer.

Legend: `T` tokens of the forward, `E` experts of a layer, `K` top-k, `L` host MoE layers, `N`
staging buffers (--gpu-prefetch-window).

Decode reads a few experts per token, which the CPU does at DRAM speed. Prefill multiplies each
expert by many tokens, which is compute the CPU lacks: past a few dozen tokens it is cheaper to
copy the whole layer over PCIe and run the GPU MoE kernel. The copy is the native engine's packed
bytes as they lie in host RAM (pinned in place with cudaHostRegister), read on the GPU by a kernel
that knows that layout (layers/moe/packed_kernels.py), so host RAM holds one copy of the experts.

Two ways to copy a forward's layers (`StreamSession`):
- prefetch (N >= 1): N staging buffers in VRAM, layer j in buffer j % N. A copy stream copies
  whole layers ahead of the compute stream, from layer j + N as soon as layer j's kernel has
  finished with the buffer; the compute stream waits for a layer's copy only when it needs it.
  Nothing waits on the host, so a whole forward can be enqueued while decodes keep stepping.
- selective (N = 0, or when copying only the experts expected to get tokens, plus a host sync,
  beats copying the whole layer): at each layer the host reads which experts got tokens (a sync)
  and copies only those.

The threshold in tokens comes from `StreamingCost`: the CPU's measured time for a layer against
the copy at the measured pinned PCIe speed. Both are measured at startup and printed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from twinfer.hybrid.cpu_experts import HostExperts
    from twinfer.layers.moe import MoELayer

logger = logging.getLogger(__name__)

# NOTE: a selective layer costs a host round trip (routing to the host, then the copies'
# launches): ~100 us, measured as the per-layer sync cost of the CPU expert path on the H100 host.
SELECTIVE_SYNC_SECONDS = 100e-6
# NOTE: a streamed layer's launches (alignment, two GEMMs, the sum, event waits and records):
# ~30 us of host time, which bounds small forwards (a tiny model's whole layer copies in less).
STREAM_LAYER_SECONDS = 30e-6
# NOTE: copies go out in pieces this size, so that a decode's small host-to-device copy (the
# CPU experts' result, one per layer) never queues behind a whole layer (~6 ms for int4 on the
# benchmark model). On the H100 it did not queue even behind 600 MB of 8 MiB pieces (0.04 ms),
# so the pieces are large enough to cost few launches (~10 a layer).
COPY_PIECE_BYTES = 32 * 2**20
# Token counts at which the CPU expert time of a layer is measured (those above the CPU engine's
# buffers are left out). NOTE: a few tokens read a few experts (DRAM-bound), many tokens read all
# of them many times (compute-bound), so the time is no straight line: it is interpolated.
_CPU_PROBE_TOKENS = (1, 16, 64, 256)


def expected_active_fraction(tokens: int, num_experts: int, top_k: int) -> float:
    """Expected share of a layer's experts that get at least one of `tokens` tokens when each
    token picks `top_k` of `num_experts` uniformly (a real router is skewed: fewer)."""
    return 1.0 - (1.0 - top_k / num_experts) ** tokens


@dataclass(frozen=True, slots=True)
class StreamingCost:
    """Per-layer cost model of running host experts for a forward of T tokens.

    CPU: interpolated between measured (tokens, seconds) points, extrapolated past the last
    along the last segment's slope. GPU: the copy of the layer's bytes at
    `pcie_gbps`; with selective copies only the expected experts with tokens, plus a host sync;
    plus the layer's launches. The GPU kernel's own time is left out: near the threshold it is a
    few percent of the copy.
    """

    pcie_gbps: float
    layer_bytes: int  # the largest host layer's packed bytes
    num_experts: int
    top_k: int
    cpu_points: tuple[tuple[int, float], ...]  # (tokens, seconds), ascending tokens
    window: int

    def cpu_seconds(self, tokens: int) -> float:
        pts = self.cpu_points
        if tokens <= pts[0][0] or len(pts) == 1:
            return pts[0][1] if tokens <= pts[0][0] else pts[0][1] * tokens / pts[0][0]
        for (t0, s0), (t1, s1) in zip(pts, pts[1:], strict=False):
            if tokens <= t1:
                return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)
        (t0, s0), (t1, s1) = pts[-2], pts[-1]
        return s1 + max(s1 - s0, 0.0) * (tokens - t1) / (t1 - t0)

    def copy_seconds(self, tokens: int, selective: bool) -> float:
        full = self.layer_bytes / (self.pcie_gbps * 1e9)
        if not selective:
            return full
        frac = expected_active_fraction(tokens, self.num_experts, self.top_k)
        return frac * full + SELECTIVE_SYNC_SECONDS

    def selective(self, tokens: int) -> bool:
        """Copy only the experts with tokens (one layer at a time) rather than prefetch whole
        layers: always with no prefetch window, else when it moves fewer bytes than the sync
        costs."""
        if self.window == 0:
            return True
        return self.copy_seconds(tokens, True) < self.copy_seconds(tokens, False)

    def gpu_seconds(self, tokens: int) -> float:
        return self.copy_seconds(tokens, self.selective(tokens)) + STREAM_LAYER_SECONDS

    def threshold(self, max_tokens: int) -> int | None:
        """The fewest tokens (up to `max_tokens`) for which the GPU beats the CPU; None if the
        CPU is faster for every forward the scheduler can send."""
        for tokens in range(1, max_tokens + 1):
            if self.gpu_seconds(tokens) < self.cpu_seconds(tokens):
                return tokens
        return None

    def describe(self, threshold: int | None, max_tokens: int) -> str:
        full_ms = self.copy_seconds(0, False) * 1e3
        cpu = ", ".join(f"{s * 1e3:.2f} ms at {t}" for t, s in self.cpu_points)
        text = (
            f"GPU prefill streaming: pinned PCIe {self.pcie_gbps:.1f} GB/s, a host layer "
            f"({self.layer_bytes / 2**20:.0f} MiB) copies in {full_ms:.2f} ms; CPU experts a "
            f"layer: {cpu} tokens"
        )
        if threshold is None:
            return text + f"; the CPU wins up to {max_tokens} tokens, so nothing streams"
        return text + f" -> forwards of >= {threshold} tokens stream (--gpu-prefill-min-tokens)"


# ---- the per-forward session, read by MoELayer ------------------------------------------------

# ---- the streamer ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Shard:
    host: Tensor  # uint8 view of the shard's packed bytes in host RAM (registered: pinned)
    offset: int  # byte offset in the staging buffer
    stride: int  # bytes per expert

    def copy_to(self, buf: Tensor, lo: int = 0, hi: int | None = None) -> int:
        """Enqueue host bytes [lo, hi) into `buf` at the same offsets, in pieces, on the current
        stream; returns the bytes."""
        hi = self.host.numel() if hi is None else hi
        for a in range(lo, hi, COPY_PIECE_BYTES):
            z = min(a + COPY_PIECE_BYTES, hi)
            buf[self.offset + a : self.offset + z].copy_(self.host[a:z], non_blocking=True)
        return hi - lo


class PrefillStreamer:
    """Streams a model's host expert layers through N VRAM staging buffers for long forwards."""

    def __init__(
        self,
        moe_layers: list[MoELayer],
        device: torch.device,
        window: int,
        min_tokens: int | None,
        max_tokens: int,
    ) -> None:
        from twinfer.layers.moe.packed_kernels import PackedGeometry

        layers = [m.host_experts for m in moe_layers]
        if not layers or any(h is None or h.layer is None for h in layers):
            raise ValueError("GPU prefill streaming needs host experts on the native engine")
        self.layers: list[HostExperts] = layers
        self.top_k = moe_layers[0].top_k
        self.device = device
        self.window = window
        self.position = {h.layer_id: j for j, h in enumerate(layers)}
        self.geoms = []
        self.shards: list[list[_Shard]] = []
        self._registered: list[int] = []
        for h in layers:
            plan = h.layer.shard_plan()
            geom = PackedGeometry.from_shard_plan(
                plan, h.layer.format, h.layer.group_size, h.layer.num_experts, h.layer.hidden,
                h.layer.inner,
            ).to(device)  # fmt: skip
            self.geoms.append(geom)
            self.shards.append(
                [
                    _Shard(self._pin(s["arena_ptr"], s["arena_bytes"]), off, s["stride"])
                    for s, off in zip(plan, geom.shard_offsets, strict=True)
                ]
            )
        self.layer_bytes = max(g.nbytes for g in self.geoms)
        self.buffers = [
            torch.empty(self.layer_bytes, dtype=torch.uint8, device=device)
            for _ in range(max(1, window))
        ]
        # When each buffer's last reader finished (a copy into it waits for this).
        self.buffer_free: list[torch.cuda.Event | None] = [None] * len(self.buffers)
        self.copy_stream = torch.cuda.Stream(device)
        self.max_tokens = max_tokens
        # Since start: forwards streamed, host layers run on the GPU, bytes copied to it.
        self.stats = {"forwards": 0, "layers": 0, "bytes": 0}
        self.cost = self._measure_cost()
        if min_tokens is None:
            self.min_tokens = self.cost.threshold(max_tokens)
            logger.info("%s", self.cost.describe(self.min_tokens, max_tokens))
        else:
            self.min_tokens = min_tokens
            logger.info(
                "%s; --gpu-prefill-min-tokens %d set", self.cost.describe(None, 0), min_tokens
            )

    @property
    def staging_bytes(self) -> int:
        return self.layer_bytes * len(self.buffers)

    def _pin(self, ptr: int, nbytes: int) -> Tensor:
        """Register a shard's packed bytes with CUDA (pinned in place: DMA-able, no second
        copy) and view them as a uint8 tensor."""
        rc = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        if int(rc) != 0:
            raise RuntimeError(
                f"cudaHostRegister of {nbytes / 2**20:.0f} MiB of host experts failed (CUDA "
                f"error {int(rc)}); run with --gpu-prefill-min-tokens 0 to keep prefill on the "
                "CPU"
            )
        self._registered.append(ptr)
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)

    def close(self) -> None:
        """Unpin the host experts (before their memory is freed)."""
        if self._registered:
            torch.cuda.synchronize(self.device)
        while self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._registered.pop())

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def streams(self, num_tokens: int) -> bool:
        return self.min_tokens is not None and num_tokens >= self.min_tokens

    def in_background(self, num_tokens: int) -> bool:
        """Whether a forward of `num_tokens` streams without ever waiting on the host, so it can
        run beside decode steps (prefetch mode)."""
        return self.streams(num_tokens) and not self.cost.selective(num_tokens)

    @contextlib.contextmanager
    def streaming(self, session: StreamSession | None) -> Iterator[None]:
        """The host MoE layers of forwards run inside this block stream their experts through
        `session` (None: they run on the CPU expert engine)."""
        engine = self.layers[0].engine
        engine.stream_session = session
        try:
            yield
        finally:
            engine.stream_session = None

    def session(self, num_tokens: int) -> StreamSession | None:
        """The stream session of one forward, or None when it runs on the CPU."""
        if not self.streams(num_tokens):
            return None
        self.stats["forwards"] += 1
        return StreamSession(self, self.cost.selective(num_tokens))

    # ---- measurements ----
    def _measure_cost(self) -> StreamingCost:
        """Pinned H2D GB/s of the first layer's real copy, and the CPU engine's time for one
        layer at two token counts (a straight line through them)."""
        first = self.layers[0]
        buf = self.buffers[0]
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            for shard in self.shards[0]:
                shard.copy_to(buf)
            torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - t0)
        pcie_gbps = self.geoms[0].nbytes / best / 1e9
        probes = [t for t in _CPU_PROBE_TOKENS if t <= first.engine.max_tokens]
        geom = self.geoms[0]
        return StreamingCost(
            pcie_gbps=pcie_gbps,
            layer_bytes=self.layer_bytes,
            num_experts=geom.num_experts,
            top_k=self.top_k,
            cpu_points=tuple((t, self._cpu_seconds(first, t)) for t in probes),
            window=self.window,
        )

    def _cpu_seconds(self, host: HostExperts, tokens: int) -> float:
        gen = torch.Generator().manual_seed(0)
        e, k = host.layer.num_experts, self.top_k
        hidden = torch.randn(tokens, host.hidden_size, generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(tokens)])
        weights = torch.full((tokens, k), 1.0 / k)
        host.forward(hidden, weights, ids.to(torch.int32))  # warm
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            host.forward(hidden, weights, ids.to(torch.int32))
            best = min(best, time.perf_counter() - t0)
        return best


@dataclass(frozen=True, slots=True)
class PrefetchPlan:
    """Which layer's copy goes where and when, with `num_buffers` staging buffers: layer j uses
    buffer j % N; the first N copies start with the forward; the copy of layer j + N starts when
    layer j's kernel has finished with the buffer. So at most N layers are copied or resident at
    once, and copies run up to N - 1 layers ahead of the computing layer."""

    num_layers: int
    num_buffers: int

    def buffer(self, layer: int) -> int:
        return layer % self.num_buffers

    def initial(self) -> range:
        return range(min(self.num_buffers, self.num_layers))

    def after_compute(self, layer: int) -> int | None:
        nxt = layer + self.num_buffers
        return nxt if nxt < self.num_layers else None


class StreamSession:
    """One forward's walk through the host layers, in order (see the module docstring)."""

    def __init__(self, streamer: PrefillStreamer, selective: bool) -> None:
        self.s = streamer
        self.selective = selective
        self.next = 0
        self.copied: dict[int, torch.cuda.Event] = {}
        self.plan = PrefetchPlan(len(streamer.layers), len(streamer.buffers))
        if not selective:
            for j in self.plan.initial():
                self._copy_layer(j)

    def _copy_layer(self, j: int) -> None:
        """Whole layer j into its buffer on the copy stream, once the buffer is free."""
        b = self.plan.buffer(j)
        stream = self.s.copy_stream
        with torch.cuda.stream(stream):
            if (free := self.s.buffer_free[b]) is not None:
                stream.wait_event(free)
            buf = self.s.buffers[b]
            for shard in self.s.shards[j]:
                self.s.stats["bytes"] += shard.copy_to(buf)
            done = torch.cuda.Event()
            done.record(stream)
        self.copied[j] = done

    def _copy_experts(self, j: int, topk_ids: Tensor, stream: torch.cuda.Stream) -> None:
        """Only layer j's experts with tokens, on the compute stream (the host reads the routing:
        a sync). Runs of consecutive experts are one copy each."""
        b = self.plan.buffer(j)
        if (free := self.s.buffer_free[b]) is not None:
            stream.wait_event(free)
        num_experts = self.s.geoms[j].num_experts
        counts = torch.bincount(topk_ids.reshape(-1), minlength=num_experts).tolist()
        buf = self.s.buffers[b]
        for lo, hi in expert_runs(counts):
            for shard in self.s.shards[j]:
                self.s.stats["bytes"] += shard.copy_to(buf, lo * shard.stride, hi * shard.stride)

    def forward(
        self, host: HostExperts, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor
    ) -> Tensor:
        """MoELayer's host expert call, computed on the GPU from the streamed bytes."""
        from twinfer.layers.moe.packed_kernels import fused_moe_packed

        j = self.s.position[host.layer_id]
        if j != self.next:
            raise RuntimeError(f"host MoE layers ran out of order: layer {j} after {self.next - 1}")
        self.next += 1
        self.s.stats["layers"] += 1
        stream = torch.cuda.current_stream(hidden.device)
        if self.selective:
            self._copy_experts(j, topk_ids, stream)
        else:
            stream.wait_event(self.copied.pop(j))
        b = self.plan.buffer(j)
        out = fused_moe_packed(hidden, topk_weights, topk_ids, self.s.buffers[b], self.s.geoms[j])
        free = torch.cuda.Event()
        free.record(stream)
        self.s.buffer_free[b] = free
        if not self.selective and (nxt := self.plan.after_compute(j)) is not None:
            self._copy_layer(nxt)
        return out


def expert_runs(counts: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) runs of consecutive experts with a nonzero count."""
    runs: list[tuple[int, int]] = []
    for e, n in enumerate(counts):
        if not n:
            continue
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs
