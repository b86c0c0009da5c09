"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF): real weights, real answers."""

from __future__ import annotations

import pytest
import torch

from tests.cli_runner import run_twinfer
from twinfer import LLM, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()  # no model: the embedded default, in the default dtype (bf16 where the CPU has it)


@pytest.fixture(scope="module")
def llm_fp32() -> LLM:
    return LLM(dtype="float32")  # transformers dequantizes the GGUF to fp32


def test_answers_paris(llm) -> None:
    from twinfer.layers.linear import LinearBase

    if llm.engine.info.dtype == torch.bfloat16:  # the GGUF's Q4_1 matrices run as int4
        linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, LinearBase)]
        assert all(m.int4_weight is not None for m in linears)
    out = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended by <|im_end|>, not by the length cap


def test_first_30_greedy_tokens_equal_transformers(llm_fp32, smollm2_gguf, smollm2_tokenizer):
    llm = llm_fp32
    from transformers import AutoModelForCausalLM

    ids = llm.engine.apply_chat_template(
        QUESTION
        + [
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "Tell me three facts about it."},
        ]
    )
    ours = (
        llm.generate(
            [ids], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    hf = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        x = torch.tensor([ids])
        # NOTE: an explicit mask: generate() would otherwise mask every pad id (2 = <|im_end|>).
        seq = hf.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False, pad_token_id=2
        )
    assert ours == seq[0, len(ids) :].tolist()
    assert smollm2_tokenizer.decode(ours)  # real text, not empty


def test_chat_template_matches_transformers(llm, smollm2_tokenizer) -> None:
    expected = smollm2_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    assert llm.engine.apply_chat_template(QUESTION) == list(expected)


def test_default_sampling_is_the_embedded_models_own(llm) -> None:
    """No flags: greedy (see DEFAULT_MODEL_SAMPLING for why not the card's 0.2 / 0.9); the same
    GGUF given by path gets the same defaults, and --generation-config vllm drops them."""
    from twinfer.loader.resolve import find_default_model

    assert llm.get_default_sampling_params().temperature == 0.0
    assert "embedded model" in llm.engine.info.describe_sampling_defaults()
    by_path = LLM(str(find_default_model()), generation_config="vllm", max_model_len=64)
    assert by_path.get_default_sampling_params().temperature == 1.0
    assert by_path.engine.info.describe_sampling_defaults().startswith("none")


def test_cli_generate_chat_prints_paris() -> None:
    """The README's first offline example, exactly: no sampling flag."""
    proc = run_twinfer("generate", "--chat", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_cli_chat_streams_from_stdin() -> None:
    proc = run_twinfer("chat", stdin="What is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_cli_bad_flag_value_is_a_clear_error() -> None:
    proc = run_twinfer("generate", "--top-p", "2", "hi")
    assert proc.returncode == 2
    assert "top_p must be in (0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr
