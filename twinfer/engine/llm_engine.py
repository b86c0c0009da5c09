"""LLMEngine: the synchronous engine, input processing + EngineCore + output processing."""

from __future__ import annotations

import logging
from typing import Any

import torch

from twinfer.config import EngineConfig
from twinfer.engine.core import EngineCore
from twinfer.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from twinfer.engine.output_processor import OutputProcessor
from twinfer.loader.model_loader import load_tokenizer, model_info
from twinfer.outputs import RequestOutput
from twinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """Runs requests to completion in this process (the offline `LLM` and the CLI use it)."""

    def __init__(self, config: EngineConfig) -> None:
        torch.manual_seed(config.seed)
        self.config = config
        self.info = model_info(config)
        self.tokenizer = load_tokenizer(config, self.info.source)
        self.core = EngineCore.from_config(config, self.info)
        self.runner = self.core.runner
        self.inputs = InputProcessor(self.tokenizer, self.info, config.max_logprobs)
        self.outputs = OutputProcessor(self.tokenizer)
        logger.info(
            "engine ready: model %s, dtype %s, device %s, max_model_len %d",
            self.info.source.name,
            str(self.info.dtype).removeprefix("torch."),
            self.info.device,
            self.info.max_model_len,
        )
        logger.info("sampling defaults: %s", self.info.describe_sampling_defaults())

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.info.source.name

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams seeded with the model's generation_config.json defaults."""
        defaults = dict(self.info.generation_defaults)
        if "max_new_tokens" in defaults:
            defaults["max_tokens"] = defaults.pop("max_new_tokens")
        return SamplingParams(**defaults)

    def add_request(
        self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams
    ) -> None:
        """Validate and enqueue; raises ValueError (and changes nothing) on bad input."""
        if request_id in self.outputs.states:
            raise ValueError(f"request id {request_id!r} is already in use.")
        processed = prompt if isinstance(prompt, ProcessedPrompt) else self.inputs.tokenize(prompt)
        requests = self.inputs.make_requests(request_id, processed, params)
        taken = [r.request_id for r in requests if self._id_in_use(r.request_id)]
        if taken:
            raise ValueError(
                f"request id {request_id!r} needs engine id {taken[0]!r}, which is in use; "
                "pick another request id."
            )
        self.outputs.add_request(
            request_id, processed.prompt, processed.prompt_token_ids, params, requests
        )
        for req in requests:
            self.core.add_request(req)

    def _id_in_use(self, engine_id: str) -> bool:
        return engine_id in self.core.scheduler.requests or engine_id in self.outputs.parent_of

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.outputs.abort_request(request_id))

    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.outputs.process_outputs(self.core.step())
        if stopped:
            self.core.abort_requests(stopped)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.outputs.has_unfinished_requests() or self.core.has_unfinished_requests()

    def is_empty(self) -> bool:
        return not self.outputs.has_unfinished_requests() and self.core.is_empty()

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"model {self.model_name} has no chat template; use generate() with a plain "
                "prompt instead."
            )
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))
