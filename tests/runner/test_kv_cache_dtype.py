"""--kv-cache-dtype fp8: one byte a cached value, so the same memory holds 2x the tokens of bf16
(4x fp32), and answers stay the model's."""

from __future__ import annotations

import pytest
import torch

from tests.entrypoints.test_hf_parity import check_logprobs_close
from twinfer import LLM, SamplingParams
from twinfer.config import EngineConfig

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KV_BYTES = 2**24


@pytest.mark.parametrize("kv_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_cache_holds_more_tokens_and_still_answers(kv_dtype: str) -> None:
    llm = LLM(kv_cache_dtype=kv_dtype, max_model_len=256, kv_cache_memory_bytes=KV_BYTES)
    plain = LLM(max_model_len=256, kv_cache_memory_bytes=KV_BYTES)
    runner, plain_runner = llm.engine.runner, plain.engine.runner
    assert runner.kv_cache_dtype.itemsize == 1
    assert all(layer.kv_cache.dtype == runner.kv_cache_dtype for layer in runner.attn_layers)
    ratio = runner.num_blocks / plain_runner.num_blocks  # model dtype bytes / 1
    assert ratio == pytest.approx(plain_runner.kv_cache_dtype.itemsize, rel=0.05)
    params = SamplingParams(temperature=0, max_tokens=20)
    assert "Paris" in llm.chat(QUESTION, params, use_tqdm=False)[0].outputs[0].text
    assert llm.engine.core.scheduler.kv_cache.num_free_blocks == runner.num_blocks


def test_fp8_cache_tokens_stay_close_to_the_model_dtype_cache(tiny_checkpoints) -> None:
    model = str(tiny_checkpoints("qwen3-tiny"))
    prompts = ["The quick brown fox jumps over the lazy dog because", "Once upon a time " * 12]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    ref = LLM(model, dtype="float32", max_model_len=512).generate(prompts, params, use_tqdm=False)
    fp8 = LLM(model, dtype="float32", max_model_len=512, kv_cache_dtype="fp8")
    for ours, theirs in zip(fp8.generate(prompts, params, use_tqdm=False), ref, strict=True):
        a, b = ours.outputs[0], theirs.outputs[0]
        check_logprobs_close(
            (a.token_ids, [set(lp) for lp in a.logprobs]),
            (b.token_ids, [set(lp) for lp in b.logprobs]),
            "fp8 kv",
        )


def test_bad_kv_cache_dtypes_name_the_fix() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype 'int3' is unknown; choose one of auto"):
        EngineConfig(kv_cache_dtype="int3")
    config = EngineConfig(kv_cache_dtype="fp8")
    assert config.resolved_kv_cache_dtype(torch.bfloat16, "torch") == torch.float8_e4m3fn
    assert EngineConfig().resolved_kv_cache_dtype(torch.bfloat16, "triton") == torch.bfloat16
    # Both attention backends read an fp8 cache (the GPU's triton kernels too).
    assert config.resolved_kv_cache_dtype(torch.bfloat16, "triton") == torch.float8_e4m3fn
    e5m2 = EngineConfig(kv_cache_dtype="fp8_e5m2")
    assert e5m2.resolved_kv_cache_dtype(torch.float16, "triton") == torch.float8_e5m2
    with pytest.raises(ValueError, match="read by the torch and triton attention backends"):
        config.resolved_kv_cache_dtype(torch.bfloat16, "flash")
