"""Engine behaviour on tiny models: batching, chunking, preemption and prefix caching never change
greedy tokens; bad input fails clearly and the engine serves the next request."""

from __future__ import annotations

import random

import pytest

from tests.cli_runner import run_twinfer
from twinfer import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "In 1905 Albert Einstein published",
    "北京是中国的首都",
    "x = [i * i for i in range(10)]\nprint(",
    "Once upon a time " * 20,
]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints):
    return tiny_checkpoints("qwen3-moe-tiny")


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(str(model_dir), dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def reference(llm) -> list[list[int]]:
    """Each prompt alone, default settings."""
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_invariance_with_random_neighbours(llm, reference) -> None:
    rng = random.Random(0)
    for _ in range(2):
        neighbours = [
            " ".join(
                rng.choice(["alpha", "beta", "γ", "🙂", "42"]) for _ in range(rng.randint(1, 60))
            )
            for _ in range(rng.randint(1, 6))
        ]
        batch = PROMPTS + neighbours
        rng.shuffle(batch)
        out = dict(zip(batch, tokens(llm.generate(batch, GREEDY, use_tqdm=False)), strict=True))
        assert [out[p] for p in PROMPTS] == reference


@pytest.mark.parametrize("budget", [1, 4, 16])
def test_chunked_prefill_equals_unchunked(model_dir, reference, budget) -> None:
    llm = LLM(str(model_dir), dtype="float32", max_model_len=1024, max_num_batched_tokens=budget)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_forced_preemption_equals_none(llm, model_dir) -> None:
    # Four sequences growing to ~70 tokens need ~20 blocks of 16; a pool of 10 forces preemption.
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    expected = tokens(llm.generate(PROMPTS[:4], params, use_tqdm=False))
    small = LLM(str(model_dir), dtype="float32", max_model_len=160, num_gpu_blocks_override=10)
    assert tokens(small.generate(PROMPTS[:4], params, use_tqdm=False)) == expected
    assert small.engine.core.scheduler.num_preemptions > 0
    assert small.engine.core.scheduler.kv_cache.num_free_blocks == 10


def test_prefix_cache_on_equals_off_and_reports_hits(model_dir, reference) -> None:
    off = LLM(str(model_dir), dtype="float32", max_model_len=1024, enable_prefix_caching=False)
    assert tokens(off.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    on = LLM(str(model_dir), dtype="float32", max_model_len=1024)
    long_prompt = PROMPTS[-1]
    first = on.generate(long_prompt, GREEDY, use_tqdm=False)[0]
    again = on.generate(long_prompt, GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == reference[-1]
    assert off.generate(long_prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_token_id_prompts_equal_text_prompts(llm, reference) -> None:
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    assert llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == reference[0]


def test_n_samples_and_seeds(llm) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate([PROMPTS[1], PROMPTS[0]], params, use_tqdm=False)[1]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    llm.engine.step()  # an idle step still releases the finished requests' generators
    assert not llm.engine.runner.generators


def test_stop_string_and_max_tokens(llm, reference) -> None:
    text = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = text[5:9]
    assert stop.strip(), text
    out = llm.generate(
        PROMPTS[0],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    keep = llm.generate(
        PROMPTS[0],
        SamplingParams(
            temperature=0,
            max_tokens=24,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert keep.text == text[: text.index(stop) + len(stop)]
    short = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert short[0].outputs[0].finish_reason in ("length", "stop")
    assert len(short[0].outputs[0].token_ids) <= 3


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", {}, "prompt is empty"),
        ([], {}, "prompt"),
        ([1, 2, 10**7], {}, "outside the vocabulary"),
        ("word " * 1100, {}, "max_model_len is 1024"),
        ("hi", {"temperature": -1.0}, "temperature"),
        ("hi", {"temperature": float("nan")}, "temperature must be a finite"),
        ("hi", {"presence_penalty": float("inf")}, "presence_penalty must be a finite"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"top_k": -2}, "top_k"),
        ("hi", {"top_k": 0}, "top_k"),
        ("hi", {"n": 0}, "n must be"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"logprobs": 50}, "max-logprobs"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(
    llm, reference, prompt, params, message
):
    with pytest.raises(ValueError, match=message):
        llm.generate([PROMPTS[0], prompt], SamplingParams(**params), use_tqdm=False)
    assert llm.engine.is_empty()
    assert llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == reference[0]


def test_logprobs_are_consistent(llm) -> None:
    params = SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    total = 0.0
    for token, position in zip(completion.token_ids, completion.logprobs, strict=True):
        assert token in position and 1 <= len(position) <= 4
        assert position[token].rank == 1  # greedy picks the most likely token
        assert all(lp.logprob <= 0 for lp in position.values())
        assert sorted(lp.rank for lp in position.values())[: len(position)] == list(
            range(1, len(position) + 1)
        )
        total += position[token].logprob
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True):
        assert token in position and len(position) <= 3


def test_cli_generate_reads_a_prompts_file(model_dir, tmp_path) -> None:
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nOnce upon a time\n")
    proc = run_twinfer(
        "generate",
        "--model",
        str(model_dir),
        "--prompts-file",
        str(prompts),
        "--json",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--dtype",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["The capital of France is", "Once upon a time"]
    assert all(len(line["outputs"][0]["token_ids"]) == 5 for line in lines)
    missing = run_twinfer("generate", "--prompts-file", str(tmp_path / "no"))
    assert missing.returncode == 2 and "cannot read --prompts-file" in missing.stderr


def test_an_interrupted_step_leaves_no_stale_prefix_cache(model_dir, monkeypatch) -> None:
    llm = LLM(str(model_dir), dtype="float32", max_model_len=1024)
    prompt = PROMPTS[-1]  # several full blocks
    model = llm.engine.runner.model
    original = type(model).forward

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.engine.is_empty()
    monkeypatch.setattr(type(model), "forward", original)
    out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    fresh = LLM(str(model_dir), dtype="float32", max_model_len=1024)
    assert (
        out.outputs[0].token_ids
        == fresh.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    )


def test_request_id_colliding_with_a_child_id_is_refused(llm) -> None:
    engine = llm.engine
    engine.add_request("0_a", PROMPTS[0], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="in use"):
        engine.add_request("a", PROMPTS[0], SamplingParams(n=2, max_tokens=2))
    assert list(engine.outputs.states) == ["0_a"]
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["0_a"]


def test_stop_string_on_the_last_allowed_token_reports_stop(llm) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    text = llm.generate(PROMPTS[1], plain, use_tqdm=False)[0].outputs[0].text
    stop = text[-6:]
    assert text.find(stop) == len(text) - len(stop), text
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=[stop])
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == text[: -len(stop)]
