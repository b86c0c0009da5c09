"""`twinfer.LLM`: offline batched generation, vLLM's `LLM` interface."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from twinfer.config import EngineConfig
from twinfer.engine.input_processor import ProcessedPrompt, PromptType
from twinfer.engine.llm_engine import LLMEngine
from twinfer.outputs import RequestOutput
from twinfer.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    """Load a model once, then `generate()` or `chat()` over batches of prompts.

    >>> llm = LLM()                      # the embedded SmolLM2-135M-Instruct
    >>> llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, a token-id list, or a list of either).

        All prompts are validated before any is queued, so one bad prompt raises a ValueError and
        leaves the engine untouched.
        """
        batch = _as_batch(prompts)
        params = self._params_for(batch, sampling_params)
        processed = [self.engine.inputs.tokenize(p) for p in batch]
        for p, sp in zip(processed, params, strict=True):
            self.engine.inputs.validate(p, sp)
        return self._run(list(zip(processed, params, strict=True)), use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            self.engine.apply_chat_template(conv, **(chat_template_kwargs or {}))
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _params_for(self, batch: list[PromptType], sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(batch)
        if len(sampling_params) != len(batch):
            raise ValueError(
                f"got {len(sampling_params)} SamplingParams for {len(batch)} prompts; pass one, "
                "or one per prompt."
            )
        return list(sampling_params)

    def _run(self, items: list[tuple[ProcessedPrompt, SamplingParams]], use_tqdm: bool):
        ids = []
        try:
            for prompt, params in items:
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, params)
                ids.append(rid)
            finished: dict[str, RequestOutput] = {}
            bar = None
            if use_tqdm and len(items) > 1:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(items), desc="Processed prompts", dynamic_ncols=True)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            # NOTE: an interrupted batch must not leave requests holding KV blocks.
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [finished[rid] for rid in ids]


def _as_batch(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list | tuple) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if isinstance(prompts, list | tuple):
        if not prompts:
            raise ValueError("no prompts given; pass a string, token ids, or a list of them.")
        return [p if isinstance(p, str) else list(p) for p in prompts]
    raise ValueError(
        f"prompts must be a string, token ids, or a list of them, not {type(prompts)}."
    )
