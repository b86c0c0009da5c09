"""HF transformers is the oracle: greedy tokens and logprobs of every architecture, fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twinfer import LLM, SamplingParams

ARCH_SHAPES = ["llama-tiny", "qwen2-tiny", "qwen3-tiny", "qwen3-moe-tiny", "mixtral-tiny"]
NUM_TOKENS = 32
LONG_PROMPT = " ".join(f"item {i} costs {i * 7 % 97} euros;" for i in range(110))

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "北京是中国的首都，上海是",
    "Emoji story: 🙂👍🏽🚀 and then",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n",
    LONG_PROMPT,
]


def check_logprobs_close(ours, theirs, name: str) -> None:
    """vLLM semantics: equal up to the first difference, where each is in the other's top-5."""
    our_ids, our_top = ours
    hf_ids, hf_top = theirs
    for i, (a, b) in enumerate(zip(our_ids, hf_ids, strict=True)):
        if a == b:
            continue
        assert a in hf_top[i], f"{name}: step {i}: ours {a} not in HF top-5 {hf_top[i]}"
        assert b in our_top[i], f"{name}: step {i}: HF {b} not in our top-5 {our_top[i]}"
        break


@pytest.fixture(scope="module", params=ARCH_SHAPES)
def checkpoint(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints(request.param)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare 32 tokens whatever they are
    return model, AutoTokenizer.from_pretrained(checkpoint)


def test_greedy_tokens_and_prompt_logprobs_match_transformers(checkpoint, hf_model) -> None:
    model, tok = hf_model
    llm = LLM(str(checkpoint), dtype="float32", max_model_len=2048)
    params = SamplingParams(
        temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5, prompt_logprobs=0
    )
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert len(outputs[-1].prompt_token_ids) > 1000
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.inference_mode():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NUM_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            prompt_logits = model(ids).logits[0].float()
        hf_ids = gen.sequences[0, ids.shape[1] :].tolist()
        hf_top = [
            set(torch.stack(gen.logits)[i, 0].topk(5).indices.tolist()) for i in range(NUM_TOKENS)
        ]
        completion = out.outputs[0]
        our_top = [set(lp) for lp in completion.logprobs]  # sampled token + top-5
        check_logprobs_close((completion.token_ids, our_top), (hf_ids, hf_top), prompt[:20])

        # Prompt logprobs: position i scores prompt token i (the first has none).
        hf_lp = torch.log_softmax(prompt_logits, -1)
        expected = hf_lp[:-1].gather(1, ids[0, 1:, None])[:, 0]
        assert out.prompt_logprobs[0] is None
        got = torch.tensor(
            [
                pos[t].logprob
                for pos, t in zip(out.prompt_logprobs[1:], ids[0, 1:].tolist(), strict=True)
            ]
        )
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=0)
