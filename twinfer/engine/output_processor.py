"""Engine outputs become `RequestOutput`s: detokenize, find stop strings, gather logprobs and n."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twinfer.engine.detokenizer import IncrementalDetokenizer
from twinfer.engine.scheduler import EngineCoreOutput
from twinfer.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from twinfer.sampling_params import SamplingParams

TokenLogprobs = tuple[list[int], list[float], int]  # (sampled id + top ids, logprobs, sampled rank)


@dataclass(slots=True)
class _Completion:
    """One sample of a request being followed: its detokenizer and what it produced."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    output: CompletionOutput


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: dict[str, _Completion]  # engine (child) id -> completion
    prompt_logprobs: list[PositionLogprobs | None] | None
    num_cached_tokens: int = 0
    finished_children: set[str] = field(default_factory=set)


class OutputProcessor:
    """Follows every live request on the client side of the engine."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}  # by user request id
        self.parent_of: dict[str, str] = {}  # engine id -> user request id

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        engine_requests: list[Any],
    ) -> None:
        completions = {}
        for index, req in enumerate(engine_requests):
            detok = None
            if req.sampling_params.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, req.sampling_params
                )
            output = CompletionOutput(index=index, text="", token_ids=[])
            if req.sampling_params.logprobs is not None:
                output.logprobs, output.cumulative_logprob = [], 0.0
            completions[req.request_id] = _Completion(index, req.sampling_params, detok, output)
            self.parent_of[req.request_id] = request_id
        prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        self.states[request_id] = _RequestState(
            request_id, prompt, list(prompt_token_ids), params, completions, prompt_logprobs
        )

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns the engine ids to abort in the core."""
        state = self.states.pop(request_id, None)
        if state is None:
            return []
        for child in state.completions:
            self.parent_of.pop(child, None)
        return [c for c in state.completions if c not in state.finished_children]

    def process_outputs(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the updated RequestOutputs and the engine ids a stop string ended."""
        updated: dict[str, _RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            parent = self.parent_of.get(out.request_id)
            if parent is None:
                continue  # aborted meanwhile
            state = self.states[parent]
            state.num_cached_tokens = out.num_cached_tokens
            completion = state.completions[out.request_id]
            if out.new_prompt_logprobs is not None and completion.index == 0:
                state.prompt_logprobs.extend(self._positions(out.new_prompt_logprobs))
            finish_reason, stop_reason = out.finish_reason, out.stop_reason
            stop_str = self._append(completion, out, finish_reason)
            if stop_str is not None:
                if finish_reason is None:  # the engine still runs it
                    to_abort.append(out.request_id)
                finish_reason, stop_reason = "stop", stop_str
            if finish_reason is not None:
                completion.output.finish_reason = finish_reason
                completion.output.stop_reason = stop_reason
                state.finished_children.add(out.request_id)
            updated[parent] = state
        results = [self._request_output(state) for state in updated.values()]
        for result in results:
            if result.finished:
                self._forget(result.request_id)
        return results, to_abort

    def _append(
        self, c: _Completion, out: EngineCoreOutput, finish_reason: str | None
    ) -> str | None:
        output = c.output
        output.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None and output.logprobs is not None:
            for entry in self._positions_of_tokens(out.new_logprobs):
                output.logprobs.append(entry)
            output.cumulative_logprob += sum(lp[1][0] for lp in out.new_logprobs)
        if c.detokenizer is None:
            return None
        stop_terminated = finish_reason == "stop" and (
            out.stop_reason is None or isinstance(out.stop_reason, int)
        )
        stop_str = c.detokenizer.update(out.new_token_ids, stop_terminated)
        # NOTE: while running, the tail that may begin a stop string is held back; at the end a
        # cut multi-byte character shows as U+FFFD, as a full decode would.
        finished = finish_reason is not None or stop_str is not None
        output.text = c.detokenizer.get_next_output_text(finished, delta=False)
        return stop_str

    def _positions_of_tokens(self, entries: list[TokenLogprobs]) -> list[PositionLogprobs]:
        return [self._position(ids, vals, rank) for ids, vals, rank in entries]

    def _positions(self, chunk: tuple[list[list[int]], list[list[float]], list[int]]):
        ids, vals, ranks = chunk
        return [self._position(i, v, r) for i, v, r in zip(ids, vals, ranks, strict=True)]

    def _position(self, ids: list[int], vals: list[float], rank: int) -> PositionLogprobs:
        """Chosen token first (with its true rank), then the top-n ranked 1..n."""
        decode = self._decode
        position = {ids[0]: Logprob(vals[0], rank, decode(ids[0]))}
        for r, (tid, val) in enumerate(zip(ids[1:], vals[1:], strict=True), start=1):
            if tid not in position:
                position[tid] = Logprob(val, r, decode(tid))
        return position

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _request_output(self, state: _RequestState) -> RequestOutput:
        finished = len(state.finished_children) == len(state.completions)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs,
            outputs=[c.output for c in state.completions.values()],
            finished=finished,
            num_cached_tokens=state.num_cached_tokens,
        )

    def _forget(self, request_id: str) -> None:
        state = self.states.pop(request_id)
        for child in state.completions:
            self.parent_of.pop(child, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)
