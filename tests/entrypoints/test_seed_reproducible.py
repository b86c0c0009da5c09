"""A seeded request samples the same tokens alone and beside any load (README: "reproducible
whatever the batch"): its draws come from its own generator, and on the CPU every kernel computes a
sequence's rows as it would alone (attention runs one sequence at a time)."""

from __future__ import annotations

import random

import pytest

from twinfer import LLM, SamplingParams

SEEDED = SamplingParams(temperature=1.0, seed=42, max_tokens=24, ignore_eos=True)
TARGET = "Tell me a story about a dragon and a knight, and what they found in the cave."


def run(llm: LLM, arrivals: list[tuple[int, str, int]]) -> list[int]:
    """The seeded request's tokens, with neighbours (step, prompt, max_tokens) arriving while it
    prefills and decodes; unseeded neighbours sample at temperature 1 too."""
    engine = llm.engine
    engine.add_request("target", TARGET, SEEDED)
    pending, step, tokens = sorted(arrivals), 0, None
    while engine.has_unfinished_requests() or pending:
        while pending and pending[0][0] <= step:
            _, prompt, n = pending.pop(0)
            params = SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True)
            engine.add_request(f"load-{step}-{len(pending)}", prompt, params)
        for out in engine.step():
            if out.request_id == "target" and out.finished:
                tokens = out.outputs[0].token_ids
        step += 1
    assert tokens is not None and len(tokens) == SEEDED.max_tokens
    return tokens


@pytest.mark.parametrize(
    ("dtype", "moe_backend"), [("float32", "auto"), ("bfloat16", "auto"), ("float32", "torch")]
)
def test_seeded_request_is_the_same_alone_and_beside_load(
    tiny_checkpoints, dtype: str, moe_backend: str
) -> None:
    # A small step budget: prompts are chunked and share steps with decodes; neighbours longer
    # and shorter than the target (a padded, masked decode batch gave different last bits in bf16).
    llm = LLM(
        str(tiny_checkpoints("qwen3-moe-tiny")),
        dtype=dtype,
        max_model_len=1024,
        max_num_batched_tokens=48,
        moe_backend=moe_backend,  # auto: the native CPU expert engine where built
    )
    alone = run(llm, [])
    rng = random.Random(0)
    words = ["alpha", "beta", "γ", "🙂", "42", "dragon", "cave"]
    for _ in range(4):
        arrivals = [
            (
                rng.randint(0, 8),
                " ".join(rng.choice(words) for _ in range(rng.randint(1, 250))),
                rng.randint(1, 30),
            )
            for _ in range(rng.randint(1, 5))
        ]
        assert run(llm, arrivals) == alone, arrivals
    assert run(llm, []) == alone  # and alone again, after the cache holds its prefix
