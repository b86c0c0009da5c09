"""OpenAI request bodies (pydantic), with vLLM's extra sampling fields.

Unknown fields are accepted and ignored, as vLLM does: clients and agent frameworks send fields of
newer API versions (`store`, `metadata`, ...) and must keep working; each request logs what it
ignored at debug level, and the first time a field name is seen it is a warning. OpenAI parameters
twinfer does not implement yet are known to the schema and refused by `unsupported()` with a
message that names them (never silently ignored).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from twinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # parallel samples per prompt: more would only queue behind each other

# NOTE: strict: JSON types are checked, not coerced ("yes" is not a bool, "2" not an int), so a
# client's type bug is a 400 rather than a surprise; ints are still accepted where floats are.
# Unknown fields are kept aside (`model_extra`) and reported by `_Lenient`.
_STRICT = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)
_WARNED: set[str] = set()  # "Model.field" names already warned about


class _Lenient(BaseModel):
    """A body part whose unknown fields are ignored with a log line (see the module's doc)."""

    model_config = _STRICT

    @model_validator(mode="after")
    def _note_unknown(self) -> _Lenient:
        if self.model_extra:
            names = sorted(f"{type(self).__name__}.{k}" for k in self.model_extra)
            logger.debug("ignored unknown fields: %s", ", ".join(names))
            for name in set(names) - _WARNED:
                _WARNED.add(name)
                logger.warning("ignoring unknown request field %s (logged once)", name)
        return self


TokenIds = list[Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]]


def lone_surrogate(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(field path, what is wrong) for the first string in a JSON value that is not valid
    Unicode text, else None. JSON's `\\ud800` escapes decode to lone UTF-16 surrogates, which
    no tokenizer can encode (they were a 500 that also broke the connection).

    NOTE: runs on the event loop for every request body (up to 1 MiB): ASCII strings and numbers
    are skipped without work, and a path is built only along containers (0.03 s for 250k ids)."""
    kind = type(value)
    if kind is str:
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = f"\\u{ord(value[exc.start]):04x}"
            return ".".join(path), f"lone UTF-16 surrogate {char} at character {exc.start}"
        return None
    if kind is list:
        items = ((str(i), item) for i, item in enumerate(value) if type(item) in _CONTAINERS)
    elif kind is dict:
        items = value.items()
    else:
        return None
    for key, item in items:
        name = str(key)
        if not name.isascii():  # a bad key is as unencodable as a bad value
            if (found := lone_surrogate(name, path)) is not None:
                return found
            name = name.encode("utf-8", "backslashreplace").decode()
        if (found := lone_surrogate(item, (*path, name))) is not None:
            return found
    return None


_CONTAINERS = (str, list, dict)


class _Request(_Lenient):
    """A request body: strict types, only valid Unicode text; unknown fields ignored."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        if (found := lone_surrogate(data)) is not None:
            param, problem = found
            raise PydanticCustomError(
                "invalid_text",
                "{where}: the text is not valid Unicode ({problem}); send UTF-8 text, with "
                "surrogate pairs joined",
                {"param": param, "where": param or "a key of the body", "problem": problem},
            )
        return data


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields common to completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    # Structured outputs (vLLM's field and its removed guided_* spellings): known, so that a
    # request that asks for them is refused by name until they are implemented.
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    )

    def unsupported(self) -> str | None:
        """The first parameter given that twinfer does not implement, if any."""
        for name in self.UNSUPPORTED:
            if getattr(self, name) is not None:
                return name
        return None

    def sampling_params(
        self, defaults: dict[str, Any], max_tokens: int | None, **extra: Any
    ) -> SamplingParams:
        """SamplingParams from the request; the model's generation defaults fill the gaps."""
        given = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
        }
        merged = {k: v for k, v in defaults.items() if k in given}
        merged.update({k: v for k, v in given.items() if v is not None})
        return SamplingParams(
            max_tokens=max_tokens, logit_bias=self.token_bias(), **merged, **extra
        )

    def token_bias(self) -> dict[int, float] | None:
        """logit_bias with its keys (token ids as JSON strings) as ints."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(
                    f'logit_bias keys must be token ids written as strings (e.g. "50256"), '
                    f"got {key!r}."
                )
            bias[int(key)] = value
        return bias


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (*_SamplingRequest.UNSUPPORTED, "suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (str or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    # OpenAI parameters twinfer does not implement yet: refused when given.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    # Accepted: meaningful only with tools (refused above until tool calls land) or with a
    # reasoning model's template.
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        *_SamplingRequest.UNSUPPORTED,
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "audio",
        "modalities",
        "prediction",
    )


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds
