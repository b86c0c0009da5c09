"""transformers as the oracle of a loaded checkpoint: greedy tokens and top-5 per step, compared
with vLLM's check_logprobs_close rule (equal up to the first difference, where each side's token
is in the other's top-5)."""

from __future__ import annotations

import torch

from tests.entrypoints.test_hf_parity import check_logprobs_close
from twinfer import LLM, SamplingParams


def assert_greedy_matches_hf(
    llm: LLM, hf, tokenizer, prompts: list[str], num_tokens: int, same_prefix: int = 0
) -> None:
    """`llm` and the transformers model `hf` decode each prompt greedily for `num_tokens`; the
    first `same_prefix` tokens must be identical (the same function, no early divergence)."""
    hf.generation_config.eos_token_id = None  # compare num_tokens tokens whatever they are
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True, logprobs=5)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            gen = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=num_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        hf_ids = gen.sequences[0, ids.shape[1] :].tolist()
        hf_top = [set(gen.logits[i][0].topk(5).indices.tolist()) for i in range(num_tokens)]
        ours = out.outputs[0]
        our_top = [set(lp) for lp in ours.logprobs]
        check_logprobs_close((ours.token_ids, our_top), (hf_ids, hf_top), prompt[:20])
        assert ours.token_ids[:same_prefix] == hf_ids[:same_prefix], prompt[:20]
