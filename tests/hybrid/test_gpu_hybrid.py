"""Hybrid MoE on a real GPU: routed experts in host RAM on the CPU expert engine, the rest on the
GPU, with CUDA graphs. GPU only (marked `gpu`).

Placement invariance: all experts on the GPU, all on the CPU and mixed placements give the same
greedy tokens, eager and graph; a graph replay of a padded batch equals eager; the VRAM budget.
"""

from __future__ import annotations

import pytest

from tests.entrypoints.test_gpu_cuda_path import UTIL, _free_gpu_memory, _ours
from tests.entrypoints.test_hf_parity import PROMPTS, check_logprobs_close
from twinfer import LLM
from twinfer.layers.moe import MoELayer
from twinfer.native import native_engine, native_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(native_engine is None, reason=f"no native engine: {native_error}"),
]
PLACEMENTS = {
    "all-gpu": {},
    "all-cpu": {"cpu_moe": True},
    "all-cpu-eager": {"cpu_moe": True, "enforce_eager": True},
    "first-cpu": {"n_cpu_moe": 1},
    "last-cpu-eager": {"moe_gpu_layers": "0", "enforce_eager": True},
}


def _llm(path, **kwargs) -> LLM:
    return LLM(
        str(path), device="cuda", max_model_len=512, max_num_seqs=8, gpu_memory_utilization=UTIL,
        moe_cpu_threads=2, **kwargs,
    )  # fmt: skip


def _on_host(llm: LLM) -> list[bool]:
    return [m.on_host for m in llm.engine.runner.model.modules() if isinstance(m, MoELayer)]


@pytest.mark.parametrize("shape", ["qwen3-moe-tiny", "mixtral-tiny"])
def test_placement_invariance_on_cuda(tiny_checkpoints, shape) -> None:
    """fp32: every placement, eager or graph, gives the all-GPU run's greedy tokens (top-5 rule);
    3 prompts replay the 4-graph with a padded row the CPU engine skips."""
    path = tiny_checkpoints(shape)
    prompts = PROMPTS[:3]
    runs = {}
    for name, kwargs in PLACEMENTS.items():
        llm = _llm(path, dtype="float32", **kwargs)
        assert (llm.engine.runner.graphs is None) == ("eager" in name), name
        expect = {"all-gpu": [False, False], "first-cpu": [True, False]}
        expect["last-cpu-eager"] = [False, True]
        assert _on_host(llm) == expect.get(name, [True, True]), name
        runs[name] = _ours(llm, prompts)
        del llm
        _free_gpu_memory()
    for name, run in runs.items():
        for i, (ours, ref) in enumerate(zip(run, runs["all-gpu"], strict=True)):
            check_logprobs_close(ours, ref, f"{shape} {name} prompt {i}")


@pytest.mark.parametrize("fmt", ["keep", "int4"])
def test_graph_replay_equals_eager_with_cpu_experts(tiny_checkpoints, fmt) -> None:
    """bf16 model, every expert on the CPU: one graph per decode step (CPU experts included)
    gives exactly the eager tokens, for batches that fill their graph and that pad it."""
    path = tiny_checkpoints("qwen3-moe-tiny")
    # NOTE: no GPU prefill streaming: on this tiny model it would win from a few tokens, and an
    # eager decode batch would then stream while a replayed graph always runs the CPU experts.
    kw = dict(
        dtype="bfloat16", cpu_moe=True, moe_cpu_dtype=fmt, moe_cpu_group_size=32,
        gpu_prefill_min_tokens=0,
    )  # fmt: skip
    graph, eager = _llm(path, **kw), _llm(path, enforce_eager=True, **kw)
    assert graph.engine.runner.graphs is not None
    for n in (1, 3, 8):
        prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(n)]
        got, want = _ours(graph, prompts), _ours(eager, prompts)
        assert [g[0] for g in got] == [w[0] for w in want], f"batch {n}"
    del graph, eager
    _free_gpu_memory()


def test_vram_budget(tiny_checkpoints) -> None:
    path = tiny_checkpoints("qwen3-moe-tiny")
    with pytest.raises(ValueError, match="cannot hold the dense part.*give at least"):
        _llm(path, dtype="float32", moe_vram_budget="0.0001")
    llm = _llm(path, dtype="float32", moe_vram_budget="auto")  # a tiny model fits whole
    assert _on_host(llm) == [False, False]
    plan = llm.engine.info.moe_plan
    one_layer = plan.bytes_at("gpu") // 2
    del llm
    _free_gpu_memory()
    budget = (plan.dense_bytes + one_layer * 1.5) / 2**30
    llm = _llm(path, dtype="float32", moe_vram_budget=f"{budget}")
    assert _on_host(llm) == [False, True]  # the first layer fits, the second goes to host RAM
    del llm
    _free_gpu_memory()
