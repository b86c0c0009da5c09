"""Incremental detokenization and stop strings, one object per request (vLLM v1 semantics).

The output processor calls `update()` after every engine step with the tokens a request gained,
then `get_next_output_text()` to build the (streamed) output.

NOTE: fast tokenizers decode through `tokenizers.decoders.DecodeStream` (as vLLM v1 does): the
Rust side keeps a small window of ids, decodes it and emits only the new characters once they no
longer end in U+FFFD, so a multi-byte character split across byte-level tokens is emitted whole.
That costs ~1 us per token with no Python-side token strings, where the prefix/read-offset method
(`convert_ids_to_tokens` + `convert_tokens_to_string`) costs several times more. Tokenizers
without a Rust backend take the same windowed algorithm in Python over `tokenizer.decode`.

The window is primed with the tail of the prompt, so the first output token is decoded in
context (SentencePiece-style decoders strip a leading space from the first token of a sequence).
For byte-level BPE tokenizers this gives exactly `tokenizer.decode(output_ids)`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

from twinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Prompt tail used as decoding context: the shortest suffix of at least this many tokens that
# decodes without U+FFFD, searched up to _PROMPT_CONTEXT_MAX tokens (vLLM's 4..24 rule).
_PROMPT_CONTEXT_MIN = 4
_PROMPT_CONTEXT_MAX = 24
_INVALID_PREFIX_ERR = "Invalid prefix encountered"
_REPLACEMENT = "\ufffd"


@dataclass(slots=True)
class _TokenizerInfo:
    """What every request of one tokenizer shares: its Rust backend and caches."""

    backend: Any | None  # tokenizers.Tokenizer, or None for a tokenizer without a fast backend
    added_tokens: dict[int, str]  # id -> content of every added token (special or not)
    token_text: dict[int, str] = field(default_factory=dict)  # decode_token cache


_INFOS: weakref.WeakKeyDictionary[Any, _TokenizerInfo] = weakref.WeakKeyDictionary()


def _rust_backend(tokenizer: Any) -> Any | None:
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream  # noqa: F401  (tokenizers >= 0.21)
    except ImportError:
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for name in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, name, None)
        if isinstance(backend, Tokenizer):
            return backend
    return None


def _tokenizer_info(tokenizer: Any) -> _TokenizerInfo:
    try:
        info = _INFOS.get(tokenizer)
    except TypeError:  # not hashable or not weak-referenceable: no sharing, still correct
        info = None
    if info is not None:
        return info
    backend = _rust_backend(tokenizer)
    if backend is not None:
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    else:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        added = {i: str(getattr(t, "content", t)) for i, t in decoder.items()}
    info = _TokenizerInfo(backend=backend, added_tokens=added)
    with contextlib.suppress(TypeError):
        _INFOS[tokenizer] = info
    return info


class _WindowDecoder:
    """Incremental decode over a window of ids: `ctx` (tokens of the last emitted text, whose
    decode is the prefix) and `pending` (tokens fed since, not yet emitted)."""

    __slots__ = ("ctx", "pending")

    def __init__(self) -> None:
        self.ctx: list[int] = []
        self.pending: list[int] = []

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def step(self, token_id: int) -> str:
        raise NotImplementedError

    def flush(self) -> str:
        """Text of the pending tokens as a full decode would show it (U+FFFD for a character
        that never completed); called once, when the request finishes."""
        if not self.pending:
            return ""
        prefix = self.decode(self.ctx)
        text = self.decode(self.ctx + self.pending)
        self.ctx, self.pending = self.ctx + self.pending, []
        return text[len(prefix) :] if len(text) > len(prefix) else ""


class _FastDecoder(_WindowDecoder):
    """DecodeStream over the Rust tokenizer; `ctx`/`pending` mirror its window for `flush`."""

    __slots__ = ("_backend", "_skip", "_stream", "_stream_cls")

    def __init__(self, backend: Any, context: list[int], skip_special_tokens: bool) -> None:
        super().__init__()
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._skip = skip_special_tokens
        self._stream_cls = DecodeStream
        try:
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            self.ctx = list(context)
        except TypeError:  # tokenizers < 0.22 has no `ids=`: prime by stepping
            self._stream = DecodeStream(skip_special_tokens)
            for token_id in context:
                self.step(token_id)

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        try:
            text = self._stream.step(self._backend, token_id)
        except OverflowError:  # an id outside u32: decode nothing rather than kill the engine
            logger.warning("Cannot detokenize invalid token id %d.", token_id)
            return ""
        except Exception as e:
            if _INVALID_PREFIX_ERR not in str(e):
                raise
            # NOTE: some tokenizers decode non-monotonically, which breaks DecodeStream's state;
            # restart the stream without context (vLLM issue 17448).
            logger.warning("DecodeStream saw an invalid prefix; restarting it.")
            self._stream = self._stream_cls(skip_special_tokens=self._skip)
            self.ctx, self.pending = [], []
            text = self._stream.step(self._backend, token_id)
        self.pending.append(token_id)
        if text is None:  # an incomplete character or nothing visible (a skipped special)
            return ""
        self.ctx, self.pending = self.pending, []
        return text


class _SlowDecoder(_WindowDecoder):
    """DecodeStream's algorithm in Python over `tokenizer.decode`, for tokenizers without a
    Rust backend (these also honour `spaces_between_special_tokens` in `decode` themselves)."""

    __slots__ = ("_tokenizer", "_skip", "_spaces", "_prefix")

    def __init__(
        self, tokenizer: Any, context: list[int], skip_special_tokens: bool, spaces: bool
    ) -> None:
        super().__init__()
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._spaces = spaces
        self.ctx = list(context)
        self._prefix = self.decode(self.ctx)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip,
            spaces_between_special_tokens=self._spaces,
        )

    def step(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.decode(self.ctx + self.pending)
        if len(text) <= len(self._prefix) or text.endswith(_REPLACEMENT):
            return ""
        new_text = text[len(self._prefix) :]
        self.ctx, self.pending = self.pending, []
        self._prefix = self.decode(self.ctx)
        return new_text


def _prompt_context(decode: Any, prompt_token_ids: list[int]) -> list[int]:
    """The shortest prompt suffix (>= 4 tokens) that decodes cleanly, as decoding context."""
    n = len(prompt_token_ids)
    if n <= _PROMPT_CONTEXT_MIN:
        return list(prompt_token_ids)
    for i in range(_PROMPT_CONTEXT_MIN, min(n, _PROMPT_CONTEXT_MAX) + 1):
        suffix = prompt_token_ids[-i:]
        if _REPLACEMENT not in decode(suffix):
            return list(suffix)
    return list(prompt_token_ids[-_PROMPT_CONTEXT_MAX:])


class IncrementalDetokenizer:
    """Turns a request's output tokens into text step by step and applies its stop strings."""

    __slots__ = (
        "_tokenizer",
        "_info",
        "_decoder",
        "_stop",
        "_min_tokens",
        "_include_stop",
        "_stop_buffer_length",
        "_spaces_between",
        "_last_special",
        "_output_text",
        "_num_output_tokens",
        "_last_output_text_offset",
        "_stopped",
    )

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._stop = list(params.stop)
        self._min_tokens = params.min_tokens
        self._include_stop = params.include_stop_str_in_output
        # Characters held back from streaming: they could be the start of a stop string that
        # must not reach the user (vLLM's stop_buffer_length).
        if self._stop and not self._include_stop:
            self._stop_buffer_length = params.max_stop_str_len - 1
        else:
            self._stop_buffer_length = 0
        self._output_text = ""
        self._num_output_tokens = 0  # includes a stop token left out of the text
        self._last_output_text_offset = 0
        self._stopped = False
        self._last_special = False
        skip = params.skip_special_tokens
        # Spaces between added tokens only exist when they are not skipped (vLLM).
        self._spaces_between = skip or params.spaces_between_special_tokens
        self._info: _TokenizerInfo | None = None
        self._decoder: _WindowDecoder | None = None
        if tokenizer is None:
            return
        self._info = info = _tokenizer_info(tokenizer)
        if not params.detokenize:  # token ids only: update() decodes nothing
            return
        if info.backend is not None:
            backend = info.backend
            context = _prompt_context(
                lambda ids: backend.decode(ids, skip_special_tokens=skip), prompt_token_ids
            )
            self._decoder = _FastDecoder(backend, context, skip)
            if not info.added_tokens:
                self._spaces_between = True
        else:
            spaces = params.spaces_between_special_tokens
            context = _prompt_context(
                lambda ids: tokenizer.decode(ids, skip_special_tokens=skip), prompt_token_ids
            )
            self._decoder = _SlowDecoder(tokenizer, context, skip, spaces)
            self._spaces_between = True  # the slow tokenizer's decode already handles it

    @property
    def output_text(self) -> str:
        return self._output_text

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Decode the tokens a request gained; return the stop string that ended it, if any.

        `stop_terminated`: the last token is EOS or a stop token id; like vLLM its text is left
        out unless `include_stop_str_in_output` (a skipped special token adds none anyway).
        """
        decoder = self._decoder
        if not new_token_ids or decoder is None:
            self._num_output_tokens += len(new_token_ids)
            return None
        ids = new_token_ids
        if stop_terminated and not self._include_stop:
            ids = new_token_ids[:-1]

        # 1) Decode. `check_from`: text offset where stop strings may begin to match; text of the
        # first min_tokens tokens is never searched (vLLM PR 22014).
        text_len = len(self._output_text)
        check_from = text_len
        num_tokens = self._num_output_tokens
        min_tokens = self._min_tokens
        pieces: list[str] = []
        for token_id in ids:
            piece = decoder.step(token_id)
            if not self._spaces_between:
                piece = self._unspaced_special(token_id, piece)
            num_tokens += 1
            if piece:
                pieces.append(piece)
                text_len += len(piece)
            if num_tokens <= min_tokens:
                check_from = text_len
        self._num_output_tokens += len(new_token_ids)
        if pieces:
            self._output_text += pieces[0] if len(pieces) == 1 else "".join(pieces)

        # 2) Stop strings in the newly visible text (and across its boundary).
        if not self._stop or self._num_output_tokens <= min_tokens or check_from >= text_len:
            return None
        return self._check_stop(check_from)

    def _unspaced_special(self, token_id: int, piece: str) -> str:
        """spaces_between_special_tokens=False: two added tokens in a row show their raw content,
        without the space some decoders (WordPiece, Metaspace) put before a token."""
        assert self._info is not None
        special = self._info.added_tokens.get(token_id)
        if special is not None and self._last_special:
            piece = special
        self._last_special = special is not None
        return piece

    def _check_stop(self, check_from: int) -> str | None:
        """Truncate at the earliest stop string that ends after `check_from`; return it."""
        text = self._output_text
        best_index = -1
        best_stop: str | None = None
        for stop in self._stop:
            # A match must end in the new text, so it starts at most len(stop) - 1 chars before.
            index = text.find(stop, max(0, check_from - len(stop) + 1))
            if index != -1 and (best_stop is None or index < best_index):
                best_index, best_stop = index, stop
        if best_stop is None:
            return None
        end = best_index + len(best_stop) if self._include_stop else best_index
        self._output_text = text[:end]
        self._stopped = True
        return best_stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The whole text (delta=False) or what was not returned before (delta=True).

        While not finished, the last max_stop_len - 1 characters are held back when stop strings
        are set and excluded from the output; finishing releases them.
        """
        if finished and not self._stopped and self._decoder is not None:
            # A character that never completed shows as U+FFFD, as in a full decode. Not after
            # a stop string: the pending tokens lie past the cut.
            tail = self._decoder.flush()
            if tail:
                self._output_text += tail
        buffer_length = 0 if finished else self._stop_buffer_length
        text = self._output_text
        length = max(0, len(text) - buffer_length)
        if not delta:
            return text[:length] if buffer_length else text
        last = self._last_output_text_offset
        if last < length:
            self._last_output_text_offset = length
            return text[last:length]
        return ""

    def decode_token(self, token_id: int) -> str:
        """Text of one token for logprobs' `decoded_token` (vLLM: `decode([id])`, specials kept);
        cached per tokenizer since the top-N logprobs ask for many tokens every step."""
        info = self._info
        if info is None:  # no tokenizer
            return ""
        text = info.token_text.get(token_id)
        if text is None:
            if info.backend is not None:
                text = info.backend.decode([token_id], skip_special_tokens=False)
            else:
                text = self._tokenizer.decode([token_id])
            info.token_text[token_id] = text
        return text
