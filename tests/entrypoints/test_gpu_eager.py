"""The eager torch path on a CUDA GPU equals transformers there (Triton kernels come later)."""

from __future__ import annotations

import pytest
import torch

from twinfer import LLM, SamplingParams

PROMPTS = ["The quick brown fox jumps over", "北京是中国的首都，上海是", "def f(x):\n    return"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["llama-tiny", "qwen2-tiny", "qwen3-moe-tiny", "mixtral-tiny"])
def test_cuda_greedy_tokens_match_transformers(tiny_checkpoints, shape) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoints(shape)
    llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=512)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    chunked = LLM(
        str(path), device="cuda", dtype="float32", max_model_len=512, max_num_batched_tokens=4
    )
    assert [
        o.outputs[0].token_ids for o in chunked.generate(PROMPTS, GREEDY, use_tqdm=False)
    ] == ours
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    hf.generation_config.eos_token_id = None
    tok = AutoTokenizer.from_pretrained(path)
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=0,
            )
        assert tokens == out[0, ids.shape[1] :].tolist()
