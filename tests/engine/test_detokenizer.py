"""IncrementalDetokenizer on the real SmolLM2 tokenizer; a full decode is the oracle."""

from __future__ import annotations

from typing import Any

import pytest

from twinfer.engine.detokenizer import IncrementalDetokenizer
from twinfer.sampling_params import SamplingParams

TEXTS = {
    "ascii": "The capital of France is Paris. It has 2,102,650 residents!",
    "cjk": "北京是中国的首都",
    "emoji": "🙂👍🏽",
    "code": 'def f(x):\n    """Square."""\n    return {"y": x**2}\t# done\n',
    "mixed": "Grüße 🙂 — 北京, naïve café 👍🏽!",
}


class SlowTokenizer:
    """The same tokenizer seen without a Rust backend, to exercise the slow fallback."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.added_tokens_decoder = tokenizer.added_tokens_decoder

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return self._tok.decode(ids, **kwargs)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Hi"}]
    text = smollm2_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    return smollm2_tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(params=["fast", "slow"])
def tok(request, smollm2_tokenizer):
    return smollm2_tokenizer if request.param == "fast" else SlowTokenizer(smollm2_tokenizer)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(
    detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1, stop_last: bool = False
) -> tuple[list[str], str | None]:
    """Feed `ids` `chunk` at a time like the output processor; return the deltas and stop."""
    deltas: list[str] = []
    stop = None
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        last = start + chunk >= len(ids)
        stop = detok.update(piece, stop_terminated=stop_last and last)
        finished = stop is not None or last
        deltas.append(detok.get_next_output_text(finished=finished, delta=True))
        if stop is not None:
            break
    return deltas, stop


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_equals_full_decode(tok, smollm2_tokenizer, prompt_ids, name, chunk):
    ids = encode(smollm2_tokenizer, TEXTS[name])
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams())
    deltas, stop = stream(detok, ids, chunk)
    assert stop is None
    assert "".join(deltas) == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.output_text == TEXTS[name]
    # Never a broken character on the way, though most CJK/emoji tokens are partial bytes.
    assert all("\ufffd" not in d for d in deltas)


def test_partial_characters_are_held_until_complete(smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, "🙂")
    assert len(ids) == 2 and smollm2_tokenizer.decode(ids[:1]) == "\ufffd"
    detok = IncrementalDetokenizer(smollm2_tokenizer, prompt_ids, SamplingParams())
    assert detok.update(ids[:1], False) is None
    assert detok.output_text == "" and detok.get_next_output_text(False, True) == ""
    detok.update(ids[1:], False)
    assert detok.get_next_output_text(False, True) == "🙂"


def test_unfinished_character_shows_at_finish_like_full_decode(tok, smollm2_tokenizer):
    ids = encode(smollm2_tokenizer, "ok 🙂👍🏽")[:-1]  # cut inside the last emoji
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    deltas, _ = stream(detok, ids)
    expected = smollm2_tokenizer.decode(ids)
    assert expected.endswith("\ufffd")
    assert "".join(deltas) == expected == detok.output_text
    assert all("\ufffd" not in d for d in deltas[:-1])


def test_stop_string_across_tokens(tok, smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, "Hello world, bye")
    assert smollm2_tokenizer.convert_ids_to_tokens(ids[:2]) == ["Hello", "Ġworld"]
    params = SamplingParams(stop=["lo wo"])
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas, stop = stream(detok, ids)
    assert stop == "lo wo"
    assert detok.output_text == "Hel" == "".join(deltas)
    assert len(deltas) == 2  # found on the token that completed it

    params = SamplingParams(stop=["lo wo"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas, stop = stream(detok, ids)
    assert stop == "lo wo"
    assert detok.output_text == "Hello wo" == "".join(deltas)


def test_stop_string_at_start(tok, smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, "STOP here")
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["STOP"]))
    deltas, stop = stream(detok, ids)
    assert stop == "STOP"
    assert detok.output_text == "" == "".join(deltas)
    assert detok.get_next_output_text(finished=True, delta=False) == ""


def test_earliest_of_several_stop_strings(tok, smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, "one two three four")
    params = SamplingParams(stop=["three", "two", "four"])
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    # One update with all tokens: every stop string is in view, the first in the text wins.
    stop = detok.update(ids, False)
    assert stop == "two"
    assert detok.output_text == "one "
    assert detok.get_next_output_text(finished=True, delta=True) == "one "


def test_stop_string_inside_multibyte_text(tok, smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, "北京是中国的首都")
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["中国"]))
    deltas, stop = stream(detok, ids)
    assert stop == "中国"
    assert detok.output_text == "北京是" == "".join(deltas)


def test_held_back_characters_released_at_finish(tok, smollm2_tokenizer, prompt_ids):
    text = "abcdefgh ijk"
    ids = encode(smollm2_tokenizer, text)
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["xyz12"]))
    streamed = ""
    for token_id in ids:
        assert detok.update([token_id], False) is None
        seen = detok.output_text
        held = seen[: max(0, len(seen) - 4)]  # max_stop_len - 1 characters held back
        assert detok.get_next_output_text(finished=False, delta=False) == held
        streamed += detok.get_next_output_text(finished=False, delta=True)
        assert streamed == held
    assert detok.get_next_output_text(finished=True, delta=True) == text[-4:]
    assert detok.get_next_output_text(finished=True, delta=False) == text


def test_no_hold_back_when_stop_included(smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, "abcdefgh")
    params = SamplingParams(stop=["xyz12"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(smollm2_tokenizer, prompt_ids, params)
    detok.update(ids, False)
    assert detok.get_next_output_text(finished=False, delta=True) == "abcdefgh"


def test_streamed_deltas_never_show_stop_string(smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, "Say hello world again")
    detok = IncrementalDetokenizer(smollm2_tokenizer, prompt_ids, SamplingParams(stop=["o wor"]))
    deltas, stop = stream(detok, ids)
    assert stop == "o wor"
    assert "".join(deltas) == "Say hell"  # deltas only append: the "o" was never streamed


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok, smollm2_tokenizer, prompt_ids, skip):
    ids = encode(smollm2_tokenizer, "Hi<|im_end|>\n<|im_start|>there")
    assert 2 in ids and 1 in ids
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(skip_special_tokens=skip))
    deltas, _ = stream(detok, ids)
    expected = smollm2_tokenizer.decode(ids, skip_special_tokens=skip)
    assert expected == ("Hi\nthere" if skip else "Hi<|im_end|>\n<|im_start|>there")
    assert "".join(deltas) == detok.output_text == expected


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("include", [True, False])
def test_eos_stop_token(tok, smollm2_tokenizer, prompt_ids, skip, include):
    eos = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*encode(smollm2_tokenizer, "Paris."), eos]
    params = SamplingParams(skip_special_tokens=skip, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas, stop = stream(detok, ids, stop_last=True)
    assert stop is None
    # vLLM: the stop token's text is left out unless include_stop_str_in_output (and shown
    # only when special tokens are not skipped).
    expected = "Paris.<|im_end|>" if include and not skip else "Paris."
    assert "".join(deltas) == detok.output_text == expected


def test_spaces_between_special_tokens(tok, smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, "a<|im_end|><|im_start|>b")
    for spaces in (True, False):
        params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces)
        detok = IncrementalDetokenizer(tok, prompt_ids, params)
        detok.update(ids, False)
        expected = smollm2_tokenizer.decode(
            ids, skip_special_tokens=False, spaces_between_special_tokens=spaces
        )
        assert detok.output_text == expected == "a<|im_end|><|im_start|>b"


def test_min_tokens_suppresses_stop_strings(tok, smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, " x x x x x")
    assert len(ids) == 5
    # Stop on the 4th token: the first 3 (min_tokens) are never searched.
    params = SamplingParams(stop=["x"], min_tokens=3)
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    stops = [detok.update([t], False) for t in ids[:4]]
    assert stops == [None, None, None, "x"]
    assert detok.output_text == " x x x "

    # Same when the tokens arrive in one step (speculative decoding).
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    assert detok.update(ids, False) == "x"
    assert detok.output_text == " x x x "


def test_min_tokens_not_reached_in_one_step(tok, smollm2_tokenizer, prompt_ids):
    ids = encode(smollm2_tokenizer, " x x x x x")
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["x"], min_tokens=5))
    assert detok.update(ids, False) is None
    assert detok.output_text == " x x x x x"


def test_decode_token(tok, smollm2_tokenizer):
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for token_id in [*encode(smollm2_tokenizer, "Hello 🙂"), 2]:
        expected = smollm2_tokenizer.decode([token_id])
        assert detok.decode_token(token_id) == expected
        assert detok.decode_token(token_id) == expected  # cached
    assert detok.decode_token(2) == "<|im_end|>"


def test_detokenize_false_decodes_nothing(smollm2_tokenizer):
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], SamplingParams(detokenize=False))
    assert detok.update(encode(smollm2_tokenizer, "Hello"), False) is None
    assert detok.get_next_output_text(finished=True, delta=False) == ""


def test_prompt_context_keeps_leading_space():
    """A Metaspace decoder drops the space of a sequence's first token; after a prompt it must
    stay (vLLM primes the decoder with the prompt tail). Also: a bare `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "!": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    assert tokenizer.decode([2, 3]) == "world!"
    detok = IncrementalDetokenizer(tokenizer, [1], SamplingParams())
    deltas, _ = stream(detok, [2, 3])
    assert "".join(deltas) == " world!"
    assert detok.decode_token(2) == "world"
