"""GPU prefill streaming on a real GPU: host-resident experts copied to VRAM layer by layer for
long forwards, computed there by the packed-layout kernel. GPU only (marked `gpu`).

Streamed prefill (prefetch windows 1-3 and selective copies), CPU prefill and all-GPU give the
same greedy tokens; prompt chunks streamed in the background beside running decodes give the
tokens they give alone; the flags' effects are visible in the streamer's counters.
"""

from __future__ import annotations

import pytest

from tests.entrypoints.test_gpu_cuda_path import UTIL, _free_gpu_memory, _ours
from tests.entrypoints.test_hf_parity import PROMPTS, check_logprobs_close
from twinfer import LLM, SamplingParams
from twinfer.native import native_engine, native_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(native_engine is None, reason=f"no native engine: {native_error}"),
]
# Prompts of PROMPTS are 8-60 tokens: a threshold of 8 streams every prefill, never a decode.
RUNS = {
    "all-gpu": {},
    "cpu-prefill": {"cpu_moe": True, "gpu_prefill_min_tokens": 0},
    "stream-w2": {"cpu_moe": True, "gpu_prefill_min_tokens": 8},
    "stream-w1": {"cpu_moe": True, "gpu_prefill_min_tokens": 8, "gpu_prefetch_window": 1},
    "stream-w3-eager": {
        "cpu_moe": True, "gpu_prefill_min_tokens": 8, "gpu_prefetch_window": 3,
        "enforce_eager": True,
    },
    "stream-selective": {"cpu_moe": True, "gpu_prefill_min_tokens": 8, "gpu_prefetch_window": 0},
    "stream-first-layer": {"n_cpu_moe": 1, "gpu_prefill_min_tokens": 8},
}  # fmt: skip


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("max_num_batched_tokens", 512)
    return LLM(
        str(path), device="cuda", max_model_len=512, max_num_seqs=8, gpu_memory_utilization=UTIL,
        moe_cpu_threads=2, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("shape", ["qwen3-moe-tiny", "mixtral-tiny"])
def test_streamed_prefill_matches_cpu_prefill_and_all_gpu(tiny_checkpoints, shape) -> None:
    """fp32: greedy tokens of every run equal the all-GPU run's (top-5 rule)."""
    path = tiny_checkpoints(shape)
    prompts = PROMPTS[:4]
    runs = {}
    for name, kwargs in RUNS.items():
        llm = _llm(path, dtype="float32", **kwargs)
        streamer = llm.engine.runner.streamer
        assert (streamer is None) == (not name.startswith("stream")), name
        runs[name] = _ours(llm, prompts)
        if streamer is not None:
            assert streamer.stats["forwards"] >= 1, name
            assert streamer.stats["bytes"] > 0, name
            if name == "stream-selective":
                assert streamer.cost.selective(8)
        del llm, streamer
        _free_gpu_memory()
    for name, run in runs.items():
        for i, (ours, ref) in enumerate(zip(run, runs["all-gpu"], strict=True)):
            check_logprobs_close(ours, ref, f"{shape} {name} prompt {i}")


@pytest.mark.parametrize("fmt", ["keep", "int4", "int8"])
def test_streamed_quantized_experts_match_cpu_prefill(tiny_checkpoints, fmt) -> None:
    """bf16 model: the GPU kernel reads the same packed (quantized) bytes the CPU engine runs,
    so streamed and CPU prefill agree (top-10 rule of bf16 runs)."""
    path = tiny_checkpoints("qwen3-moe-tiny")
    kw = dict(dtype="bfloat16", cpu_moe=True, moe_cpu_dtype=fmt, moe_cpu_group_size=32)
    cpu = _ours(_llm(path, gpu_prefill_min_tokens=0, **kw), PROMPTS[:4])
    _free_gpu_memory()
    llm = _llm(path, gpu_prefill_min_tokens=8, **kw)
    gpu = _ours(llm, PROMPTS[:4])
    assert llm.engine.runner.streamer.stats["layers"] >= 2
    for i, (a, b) in enumerate(zip(gpu, cpu, strict=True)):
        assert a[0][0] == b[0][0] or a[0][0] in b[1][0], f"{fmt} prompt {i}: first token"
    del llm
    _free_gpu_memory()


def test_background_chunks_beside_decodes_give_the_solo_tokens(tiny_checkpoints) -> None:
    """A 300-token prompt streams in 64-token background chunks while short requests decode;
    every request's greedy tokens equal those it gets alone with everything on the GPU."""
    path = tiny_checkpoints("qwen3-moe-tiny")
    long_prompt = [(i * 37) % 900 + 5 for i in range(300)]
    prompts = [long_prompt, *PROMPTS[:3]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)

    def run(llm: LLM) -> list:
        out = []
        # The short ones first, so they decode while the long one's chunks run.
        for o in llm.generate(prompts[1:] + prompts[:1], params, use_tqdm=False):
            out.append((o.outputs[0].token_ids, [set(lp) for lp in o.outputs[0].logprobs]))
        return out

    ref = run(_llm(path, dtype="float32", max_num_batched_tokens=64))
    _free_gpu_memory()
    llm = _llm(
        path, dtype="float32", cpu_moe=True, gpu_prefill_min_tokens=48, max_num_batched_tokens=64
    )
    runner = llm.engine.runner
    assert runner.runs_in_background(64) and not runner.runs_in_background(47)
    got = run(llm)
    assert runner.background_chunks >= 4  # 300 tokens in chunks of 64 (the 44-token tail: CPU)
    assert runner.background is None
    for i, (ours, theirs) in enumerate(zip(got, ref, strict=True)):
        check_logprobs_close(ours, theirs, f"request {i}")
    # Abort while a chunk runs: its blocks are freed after it lands (engine-empty holds).
    engine = llm.engine
    engine.add_request("long", long_prompt, params)
    engine.add_request("short", PROMPTS[0], params)
    for _ in range(3):
        engine.step()
    engine.abort_request("long")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.is_empty()
    del llm, runner, engine
    _free_gpu_memory()


def test_streaming_off_and_threshold_from_the_cost_model(tiny_checkpoints) -> None:
    """0 turns streaming off; the default threshold comes from measured speeds (on a tiny model
    the CPU wins every size, so nothing streams and no VRAM is taken)."""
    path = tiny_checkpoints("qwen3-moe-tiny")
    llm = _llm(path, dtype="float32", cpu_moe=True, gpu_prefill_min_tokens=0)
    assert llm.engine.runner.streamer is None
    assert not llm.engine.core.scheduler.runs_in_background
    del llm
    _free_gpu_memory()
    llm = _llm(path, dtype="float32", cpu_moe=True)
    streamer = llm.engine.runner.streamer
    if streamer is not None:  # a fast link and slow CPU may still find a threshold
        assert streamer.min_tokens == streamer.cost.threshold(512)
        assert streamer.cost.pcie_gbps > 0 and all(s > 0 for _, s in streamer.cost.cpu_points)
    del llm, streamer
    _free_gpu_memory()
