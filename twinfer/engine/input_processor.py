"""Prompts and sampling params become engine `Request`s, or a clear error before they get in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twinfer.engine.request import Request
from twinfer.loader.model_loader import ModelInfo
from twinfer.sampling_params import SamplingParams

PromptType = str | list[int]


@dataclass(slots=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]


class InputProcessor:
    def __init__(self, tokenizer: Any, info: ModelInfo, max_logprobs: int) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.max_logprobs = max_logprobs

    def tokenize(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty; send at least one character or token.")
            return ProcessedPrompt(prompt, list(self.tokenizer.encode(prompt)))
        if not isinstance(prompt, list | tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise ValueError("a prompt must be a string or a list of token ids (integers).")
        return ProcessedPrompt(None, list(prompt))

    def validate(self, prompt: ProcessedPrompt, params: SamplingParams) -> int:
        """Raise a ValueError naming the fix if the request cannot run; else its max_tokens."""
        ids = prompt.prompt_token_ids
        vocab = self.info.vocab_size
        max_len = self.info.max_model_len
        if not ids:
            raise ValueError("the prompt is empty; send at least one token.")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary (valid ids are 0 to {vocab - 1}); "
                "check that the prompt was tokenized for this model."
            )
        if len(ids) >= max_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {max_len} (room is needed for "
                "at least one generated token); raise --max-model-len or shorten the prompt."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise ValueError(
                    f"{name}={value} is more than the allowed {self.max_logprobs}; ask for fewer "
                    "or raise --max-logprobs."
                )
        if params.logit_bias and (bad := [t for t in params.logit_bias if t >= vocab]):
            raise ValueError(
                f"logit_bias names token id {bad[0]}, outside the vocabulary (valid ids are 0 to "
                f"{vocab - 1})."
            )
        room = max_len - len(ids)
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def make_requests(
        self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams
    ) -> list[Request]:
        """Validate and build the engine requests (n of them for n parallel samples)."""
        max_tokens = self.validate(prompt, params)
        ids = prompt.prompt_token_ids
        if params.n == 1:
            return [Request(request_id, ids, params, self.info.eos_token_ids, max_tokens)]
        return [
            Request(
                child_id(request_id, i),
                ids,
                params.clone_for_child(i),
                self.info.eos_token_ids,
                max_tokens,
            )
            for i in range(params.n)
        ]


def child_id(request_id: str, index: int) -> str:
    """Engine id of the index-th parallel sample of a request (vLLM's scheme)."""
    return f"{index}_{request_id}"
