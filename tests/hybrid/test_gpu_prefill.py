"""GPU prefill streaming's decisions, on the CPU: the threshold's cost model, selective copies,
the prefetch window's copy plan, and the flags. The streaming itself runs in test_gpu_hybrid.py."""

from __future__ import annotations

import pytest
import torch

from twinfer.config import EngineConfig
from twinfer.hybrid.gpu_prefill import (
    PrefetchPlan,
    StreamingCost,
    expected_active_fraction,
    expert_runs,
)

# The benchmark model's layer (Qwen3-30B-A3B shape, int4 g128): ~0.3 GB a layer.
LAYER_BYTES = 128 * 3 * 2048 * 768 // 2 * 33 // 32


def cpu_line(fixed: float, per_token: float) -> tuple:
    return tuple((t, fixed + t * per_token) for t in (1, 16, 64, 256))


def cost(**overrides) -> StreamingCost:
    values = dict(
        pcie_gbps=50.0,
        layer_bytes=LAYER_BYTES,
        num_experts=128,
        top_k=8,
        cpu_points=cpu_line(0.3e-3, 60e-6),
        window=2,
    )
    return StreamingCost(**(values | overrides))


def test_cpu_time_is_interpolated_between_measurements() -> None:
    c = cost(cpu_points=((1, 0.2e-3), (16, 1e-3), (64, 4e-3), (256, 15e-3)))
    assert c.cpu_seconds(1) == pytest.approx(0.2e-3)
    assert c.cpu_seconds(40) == pytest.approx(2.5e-3)
    assert c.cpu_seconds(512) == pytest.approx(15e-3 + 11e-3 * 256 / 192)  # the last slope
    # A decode's few tokens stay on the CPU: its time there is far below a layer's copy.
    assert c.threshold(8192) > 64
    assert c.gpu_seconds(1) > c.cpu_seconds(1)


def test_expected_active_fraction() -> None:
    assert expected_active_fraction(0, 128, 8) == 0
    assert expected_active_fraction(1, 128, 8) == pytest.approx(8 / 128)
    assert expected_active_fraction(64, 128, 8) == pytest.approx(1 - (120 / 128) ** 64)
    assert expected_active_fraction(4096, 128, 8) == pytest.approx(1.0)
    assert expected_active_fraction(5, 8, 8) == 1.0  # every token takes every expert


def test_threshold_is_where_the_copy_beats_the_cpu() -> None:
    c = cost()
    copy = LAYER_BYTES / 50e9  # ~6.5 ms: the CPU takes that at ~103 tokens
    t = c.threshold(8192)
    assert t is not None
    assert c.cpu_seconds(t) > c.gpu_seconds(t)
    assert c.cpu_seconds(t - 1) <= c.gpu_seconds(t - 1)
    assert t == pytest.approx((copy + 30e-6 - 0.3e-3) / 60e-6, abs=2)
    # A faster link or a slower CPU streams sooner.
    assert cost(pcie_gbps=100.0).threshold(8192) < t
    assert cost(cpu_points=cpu_line(0.3e-3, 120e-6)).threshold(8192) < t


def test_no_threshold_when_the_cpu_always_wins() -> None:
    c = cost(cpu_points=cpu_line(0.3e-3, 1e-7), pcie_gbps=1.0)
    assert c.threshold(8192) is None
    assert "nothing streams" in c.describe(None, 8192)


def test_window_zero_always_copies_only_experts_with_tokens() -> None:
    c = cost(window=0)
    assert all(c.selective(t) for t in (1, 100, 4096))
    # With few tokens only some experts are read: fewer bytes...
    assert c.copy_seconds(8, True) < c.copy_seconds(8, False)
    # ... but near the threshold every expert of a 128-expert layer has tokens, and the sync
    # makes the copy dearer than prefetching whole layers.
    assert c.threshold(8192) > cost().threshold(8192)
    # 256 experts leave ~4% without tokens there: even with a window, that layer goes selective.
    wide = cost(num_experts=256, layer_bytes=2 * LAYER_BYTES, cpu_points=cpu_line(0.3e-3, 120e-6))
    t = wide.threshold(8192)
    assert wide.selective(t) and wide.copy_seconds(t, True) < wide.copy_seconds(t, False)


def test_selective_copies_only_where_they_move_fewer_bytes() -> None:
    c = cost(num_experts=256, top_k=8)
    assert c.selective(16)  # ~40% of the experts have tokens
    assert not c.selective(4096)  # all of them: prefetch whole layers, overlapped
    frac = expected_active_fraction(16, 256, 8)
    assert c.copy_seconds(16, True) == pytest.approx(frac * c.copy_seconds(16, False) + 100e-6)


def test_describe_names_the_measurements_and_the_flag() -> None:
    c = cost()
    text = c.describe(c.threshold(8192), 8192)
    assert "50.0 GB/s" in text and "--gpu-prefill-min-tokens" in text
    assert f">= {c.threshold(8192)} tokens" in text


@pytest.mark.parametrize(("layers", "buffers"), [(1, 1), (5, 1), (5, 2), (12, 3), (2, 4)])
def test_prefetch_plan_copies_every_layer_once_ahead_of_its_compute(layers, buffers) -> None:
    plan = PrefetchPlan(layers, buffers)
    resident: dict[int, int] = {}  # buffer -> layer copied into it and not yet computed
    copied: list[int] = []

    def copy(j: int) -> None:
        b = plan.buffer(j)
        assert b not in resident, f"layer {j} overwrites layer {resident.get(b)} before use"
        resident[b] = j
        copied.append(j)
        assert len(resident) <= buffers

    for j in plan.initial():
        copy(j)
    for j in range(layers):
        assert resident.get(plan.buffer(j)) == j, f"layer {j} computes before its copy"
        del resident[plan.buffer(j)]
        if (nxt := plan.after_compute(j)) is not None:
            copy(nxt)
    assert copied == list(range(layers))
    assert not resident


def test_prefetch_plan_runs_ahead_by_the_window() -> None:
    plan = PrefetchPlan(12, 3)
    assert list(plan.initial()) == [0, 1, 2]
    assert plan.after_compute(0) == 3
    assert plan.after_compute(8) == 11
    assert plan.after_compute(9) is None
    assert PrefetchPlan(12, 1).after_compute(0) == 1  # one buffer: copy, compute, copy, ...


def test_expert_runs_merge_consecutive_experts() -> None:
    assert expert_runs([0, 3, 1, 0, 0, 2, 0, 5]) == [(1, 3), (5, 6), (7, 8)]
    assert expert_runs([0, 0]) == []
    assert expert_runs([1, 1, 1]) == [(0, 3)]


def test_flags_and_their_errors() -> None:
    config = EngineConfig(model="x", gpu_prefill_min_tokens=512, gpu_prefetch_window=3)
    assert (config.gpu_prefill_min_tokens, config.gpu_prefetch_window) == (512, 3)
    with pytest.raises(ValueError, match="gpu_prefill_min_tokens must be at least 0"):
        EngineConfig(model="x", gpu_prefill_min_tokens=-1)
    with pytest.raises(ValueError, match="gpu_prefetch_window must be at least 0"):
        EngineConfig(model="x", gpu_prefetch_window=-2)


def test_streaming_grows_the_default_chunk() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    config = EngineConfig(model="x")
    assert config.resolved_max_num_batched_tokens(cuda, host_experts=True) == 8192
    assert config.resolved_max_num_batched_tokens(cuda, host_experts=False) == 2048
    assert config.resolved_max_num_batched_tokens(cpu, host_experts=True) == 256
    off = EngineConfig(model="x", gpu_prefill_min_tokens=0)
    assert off.resolved_max_num_batched_tokens(cuda, host_experts=True) == 2048
    given = EngineConfig(model="x", max_num_batched_tokens=4096)
    assert given.resolved_max_num_batched_tokens(cuda, host_experts=True) == 4096
