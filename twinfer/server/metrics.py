"""Prometheus metrics with vLLM's names under a `twinfer:` prefix.

Gauges come from the engine's `SchedulerStats` after each step; latencies (TTFT, inter-token,
end-to-end) are measured here in the API process when outputs arrive, as vLLM v1 does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from twinfer.engine.messages import SchedulerStats
from twinfer.outputs import RequestOutput

disable_created_metrics()  # the *_created series only add noise (vLLM turns them off too)

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip


@dataclass(slots=True)
class _Timing:
    arrival: float
    last_token: float | None = None
    num_tokens: int = 0


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"twinfer:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"twinfer:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(
                f"twinfer:{name}", doc, labels, buckets=_LATENCY_BUCKETS, registry=r
            ).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences in the engine's running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting for the engine.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV cache usage (1 = every block in use).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens served from the cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted for KV blocks.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to end.")
        self.success = Counter(
            "twinfer:request_success",
            "Requests finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.model_name = model_name
        self._timings: dict[str, _Timing] = {}
        self._last_stats = SchedulerStats()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_arrival(self, request_id: str) -> None:
        self._timings[request_id] = _Timing(time.monotonic())

    def on_forget(self, request_id: str) -> None:
        """An aborted request: no latency figures for it."""
        self._timings.pop(request_id, None)

    def on_stats(self, stats: SchedulerStats) -> None:
        last, self._last_stats = self._last_stats, stats
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.prefix_queries.inc(max(stats.prefix_cache_queries - last.prefix_cache_queries, 0))
        self.prefix_hits.inc(max(stats.prefix_cache_hits - last.prefix_cache_hits, 0))
        self.preemptions.inc(max(stats.num_preemptions - last.num_preemptions, 0))

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            timing = self._timings.get(out.request_id)
            if timing is None:
                continue
            num_tokens = sum(len(c.token_ids) for c in out.outputs)
            new = num_tokens - timing.num_tokens
            if new > 0:
                if timing.last_token is None:
                    self.ttft.observe(now - timing.arrival)
                else:
                    self.itl.observe((now - timing.last_token) / new)
                timing.last_token, timing.num_tokens = now, num_tokens
                self.generation_tokens.inc(new)
            if out.finished:
                del self._timings[out.request_id]
                self.e2e.observe(now - timing.arrival)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                for c in out.outputs:
                    reason = c.finish_reason or "abort"
                    self.success.labels(self.model_name, reason).inc()
