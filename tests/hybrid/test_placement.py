"""Placement of routed experts (host RAM vs device) on the CPU: the plan, its errors, and
placement invariance: every placement gives the same greedy tokens."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.entrypoints.test_hf_parity import check_logprobs_close
from twinfer import LLM, SamplingParams
from twinfer.config import EngineConfig, parse_layer_list, parse_vram_budget
from twinfer.hybrid import placement as placement_mod
from twinfer.hybrid.numa import CpuTopology
from twinfer.layers.moe import MoELayer
from twinfer.loader.model_loader import model_info
from twinfer.native import native_engine, native_error

needs_native = pytest.mark.skipif(native_engine is None, reason=f"no native engine: {native_error}")

PROMPTS = ["The quick brown fox jumps over the lazy dog because", "def add(a, b):\n    return"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)


def _plan(checkpoint, **kwargs):
    config = EngineConfig(model=str(checkpoint), dtype="float32", device="cpu", **kwargs)
    return model_info(config).moe_plan


def _moe_layers(llm: LLM) -> list[MoELayer]:
    model = llm.engine.runner.model
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _greedy(llm: LLM):
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, [set(lp) for lp in o.outputs[0].logprobs]) for o in outs]


# ---- the plan ---------------------------------------------------------------------------------
def test_layer_list_and_budget_parsing() -> None:
    assert parse_layer_list("0-2, 5,5") == [0, 1, 2, 5]
    assert parse_vram_budget("auto") is None
    assert parse_vram_budget("20GiB") == 20.0
    for bad in ("a-b", "3-1", "-1"):
        with pytest.raises(ValueError, match="moe_gpu_layers"):
            parse_layer_list(bad)
    for bad in ("lots", "0", "-3"):
        with pytest.raises(ValueError, match="moe_vram_budget"):
            parse_vram_budget(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cpu_moe": True, "n_cpu_moe": 1}, "give only one"),
        ({"n_cpu_moe": -1}, "at least 0"),
        ({"moe_cpu_dtype": "fp4"}, "choose one of keep, bf16, fp8, int8, int4"),
        ({"moe_cpu_group_size": 48}, "one of"),
        ({"moe_cpu_threads": 0}, "at least 1"),
        ({"moe_thread_binding": "socket"}, "core, numa"),
        ({"moe_gpu_layers": "1-x"}, "0-5,40"),
    ],
)
def test_bad_placement_flags_are_clear_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_plan_follows_the_flags(tiny_checkpoints) -> None:
    ckpt = tiny_checkpoints("qwen3-moe-sparse-tiny")  # MoE layers 1 and 5 of 6
    assert [s.layer for s in _plan(ckpt, moe_backend="torch").shapes] == [1, 5]
    assert _plan(ckpt, moe_backend="torch").host_layers == frozenset()
    assert _plan(ckpt, cpu_moe=True).host_layers == {1, 5}
    assert _plan(ckpt, n_cpu_moe=1).host_layers == {1}
    assert _plan(ckpt, n_cpu_moe=0, moe_backend="torch").host_layers == frozenset()
    assert _plan(ckpt, moe_gpu_layers="5").host_layers == {1}
    plan = _plan(ckpt, cpu_moe=True, moe_cpu_dtype="bf16")
    assert plan.host_format == "bf16" and plan.device_format == "fp32"
    assert _plan(tiny_checkpoints("llama-tiny"), cpu_moe=True) is None  # no MoE layers


def test_plan_errors_name_the_fix(tiny_checkpoints) -> None:
    ckpt = tiny_checkpoints("qwen3-moe-sparse-tiny")
    with pytest.raises(ValueError, match="more than the model's 2 MoE layers; use at most 2"):
        _plan(ckpt, n_cpu_moe=3)
    with pytest.raises(ValueError, match=r"names \[0\].*MoE layers are 1,5"):
        _plan(ckpt, moe_gpu_layers="0,5")
    with pytest.raises(ValueError, match="needs a GPU"):
        _plan(ckpt, moe_vram_budget="auto")
    cores = CpuTopology.detect().physical_cores
    with pytest.raises(ValueError, match=f"more than the {cores} physical cores"):
        _plan(ckpt, cpu_moe=True, moe_cpu_threads=cores + 1)
    with pytest.raises(ValueError, match="moe-cpu-group-size"):
        _plan(ckpt, cpu_moe=True, moe_cpu_dtype="int4", moe_cpu_group_size=128)


def test_without_the_native_engine(tiny_checkpoints, monkeypatch, caplog) -> None:
    """Host experts fall back to torch's CPU kernels (with a warning); int4 cannot."""
    monkeypatch.setattr(placement_mod, "native_engine", None)
    ckpt = tiny_checkpoints("qwen3-moe-tiny")
    with pytest.raises(ValueError, match="int4 needs the native CPU expert engine: .*keep"):
        _plan(ckpt, cpu_moe=True, moe_cpu_dtype="int4", moe_cpu_group_size=32)
    assert _plan(ckpt).host_layers == frozenset()  # CPU-only mode: torch backend
    with caplog.at_level(logging.WARNING):
        assert _plan(ckpt, cpu_moe=True).host_layers == {0, 1}
    assert "several times slower" in caplog.text


# ---- placement invariance ----------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("shape", ["qwen3-moe-tiny", "mixtral-tiny"])
def test_placement_invariance(tiny_checkpoints, shape, caplog) -> None:
    """All experts on the device (torch backend), all in host RAM on the native engine, and
    mixed placements give the same greedy tokens (top-5 rule at the first difference)."""
    ckpt = str(tiny_checkpoints(shape))
    base = dict(dtype="float32", device="cpu", max_model_len=256)
    runs = {}
    for name, kwargs in {
        "device": {"moe_backend": "torch"},
        "host": {"cpu_moe": True},
        "first-host": {"n_cpu_moe": 1},
        "last-host": {"moe_gpu_layers": "0"},
        "host-2-threads": {"cpu_moe": True, "moe_cpu_threads": min(2, _cores())},
    }.items():
        with caplog.at_level(logging.INFO):
            llm = LLM(ckpt, **base, **kwargs)
        on_host = [m.on_host for m in _moe_layers(llm)]
        expected = {"device": [False, False], "first-host": [True, False]}
        expected["last-host"] = [False, True]
        assert on_host == expected.get(name, [True, True]), name
        runs[name] = _greedy(llm)
        del llm
    assert "MoE placement: 2 MoE layers of 8 experts" in caplog.text
    for name, run in runs.items():
        for i, (ours, ref) in enumerate(zip(run, runs["device"], strict=True)):
            check_logprobs_close(ours, ref, f"{shape} {name} prompt {i}")


@needs_native
def test_cpu_only_mode_uses_the_native_engine(tiny_checkpoints) -> None:
    ckpt = str(tiny_checkpoints("qwen3-moe-tiny"))
    llm = LLM(ckpt, dtype="float32", device="cpu", max_model_len=256)
    layers = _moe_layers(llm)
    assert all(m.on_host and m.host_experts.layer is not None for m in layers)
    # The torch copy is freed once packed: host RAM holds the experts once.
    assert all(m.w13_weight.numel() == 0 and m.w2_weight.numel() == 0 for m in layers)
    per_expert = placement_mod.expert_bytes("fp32", 64, 32, 0)
    assert [m.host_experts.nbytes for m in layers] == [8 * per_expert] * 2


@needs_native
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_host_experts_match_their_dequantized_weights(tiny_checkpoints, fmt) -> None:
    """int8/int4 host experts compute what the torch backend computes on the dequantized
    values (the same greedy tokens, top-5 rule)."""
    ckpt = str(tiny_checkpoints("qwen3-moe-tiny"))
    base = dict(dtype="float32", device="cpu", max_model_len=256)
    quant = LLM(ckpt, **base, cpu_moe=True, moe_cpu_dtype=fmt, moe_cpu_group_size=32)
    assert {m.placement.formats[0] for m in _moe_layers(quant)} == {fmt}
    ours = _greedy(quant)
    del quant
    ref = LLM(ckpt, **base, moe_backend="torch")
    for m in _moe_layers(ref):
        for p in (m.w13_weight, m.w2_weight):
            flat = p.data.reshape(-1, p.shape[-1]).contiguous()
            out = torch.empty_like(flat)
            native_engine.pack_unpack(
                fmt, flat.shape[0], flat.shape[1], 32 if fmt == "int4" else 0,
                flat.data_ptr(), "f32", out.data_ptr(),
            )  # fmt: skip
            p.data.copy_(out.view_as(p))
    for i, (a, b) in enumerate(zip(ours, _greedy(ref), strict=True)):
        check_logprobs_close(a, b, f"{fmt} prompt {i}")


def _cores() -> int:
    return CpuTopology.detect().physical_cores
