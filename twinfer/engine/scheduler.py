"""The scheduler: hands out token counts under a budget, one rule for prefill and decode (vLLM v1).

Every step, running requests (oldest first) get their uncomputed tokens, capped by the budget
(`max_num_batched_tokens`), which chunks long prompts; then waiting requests are admitted while
budget, `max_num_seqs` and KV blocks last. When blocks run out, the newest running request is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed.

Background prefill (host experts streamed to a GPU, see hybrid/gpu_prefill.py): a prompt chunk
for which `runs_in_background(tokens)` holds is taken out of the step's batch and handed to the
runner to run beside the following steps, one chunk at a time, outside the token budget. Its
request leaves `running` until the runner reports the chunk done, so decodes keep stepping and
nothing preempts or frees blocks the chunk is still writing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twinfer.engine.kv_cache import KVCacheManager
from twinfer.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, from request.num_computed_tokens on
    block_ids: list[int]


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    total_num_scheduled_tokens: int
    preempted_req_ids: list[str] = field(default_factory=list)
    # Requests that left the engine since the last step: the runner drops their state.
    finished_req_ids: list[str] = field(default_factory=list)
    background: ScheduledRequest | None = None  # a chunk to start beside this step
    background_in_flight: bool = False  # a chunk runs (this one or an earlier one)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.background_in_flight


@dataclass(slots=True)
class SampledToken:
    """What the runner produced for one request in one step."""

    token_id: int | None  # None while a prompt chunk does not reach the end
    logprobs: tuple[list[int], list[float], int] | None = None  # (ids, logprobs, sampled rank)
    prompt_logprobs: tuple[list[list[int]], list[list[float]], list[int]] | None = None


@dataclass(slots=True)
class RunnerOutput:
    by_request: dict[str, SampledToken]
    background: SampledToken | None = None  # the in-flight chunk's result, once it finished


@dataclass(slots=True)
class EngineCoreOutput:
    """Per-request result of a step: new tokens and whether it finished (crosses processes)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[list[int], list[float], int]] | None = None
    new_prompt_logprobs: tuple[list[list[int]], list[list[float]], list[int]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        runs_in_background: Callable[[int], bool] | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.runs_in_background = runs_in_background
        self.in_flight: ScheduledRequest | None = None  # the background chunk running
        self._in_flight_finish: RequestStatus | None = None  # an abort that waits for it
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_since_step: list[str] = []
        self.num_preemptions = 0  # since start, for logs and metrics

    # ---- membership ----
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use.")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """End requests from outside (abort, stop string found by the detokenizer)."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if self.in_flight is not None and self.in_flight.request is req:
                self._in_flight_finish = status  # its blocks are being written: free them after
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._free(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_finished_pending(self) -> bool:
        """Requests finished since the last step (the next step tells the runner to drop them)."""
        return bool(self._finished_since_step)

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.in_flight is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        background: ScheduledRequest | None = None

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = req.num_tokens - req.num_computed_tokens
            bg = 0 if background else self._background_tokens(req, remaining)
            num_new = bg or min(remaining, budget)
            while not self.kv_cache.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                if bg:
                    background = self._scheduled(req, num_new)
                    self.running.pop(i)  # back when the chunk is done
                    continue
                scheduled.append(self._scheduled(req, num_new))
                budget -= num_new
                i += 1
                continue
            break

        # NOTE: no admissions in a step that had to preempt: memory is the bottleneck.
        while not preempted and self.waiting and budget > 0:
            if self.num_running + (background is not None) >= self.max_num_seqs:
                break
            req = self.waiting[0]
            hits, num_hit_tokens = [], 0
            # NOTE: prompt logprobs need logits at every prompt position, so no cache hits then.
            if req.num_computed_tokens == 0 and req.sampling_params.prompt_logprobs is None:
                hits, num_hit_tokens = self.kv_cache.get_computed_blocks(req)
                hits = self._written(hits, background)
                num_hit_tokens = min(num_hit_tokens, len(hits) * self.kv_cache.block_size)
            remaining = req.num_tokens - req.num_computed_tokens - num_hit_tokens
            bg = 0 if background else self._background_tokens(req, remaining)
            num_new = bg or min(remaining, budget)
            if not self.kv_cache.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens += num_hit_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            if bg:
                background = self._scheduled(req, num_new)
                continue
            self.running.append(req)
            scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

        if background is not None:
            self.in_flight = background
        finished, self._finished_since_step = self._finished_since_step, []
        return SchedulerOutput(
            scheduled=scheduled,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            preempted_req_ids=preempted,
            finished_req_ids=finished,
            background=background,
            background_in_flight=self.in_flight is not None,
        )

    def _background_tokens(self, req: Request, remaining: int) -> int:
        """The size of `req`'s next chunk if it runs in the background, else 0."""
        if self.runs_in_background is None or self.in_flight is not None:
            return 0
        if req.sampling_params.prompt_logprobs is not None:
            return 0  # prompt logprobs read every position's logits: the foreground does that
        num_new = min(remaining, self.max_num_batched_tokens)
        return num_new if self.runs_in_background(num_new) else 0

    def _written(self, hits: list, starting: ScheduledRequest | None) -> list:
        """Prefix-cache hits cut before the first block a background chunk has yet to write
        (its blocks are cached when allocated, before the chunk runs)."""
        pending: set[int] = set()
        bs = self.kv_cache.block_size
        for item in (self.in_flight, starting):
            if item is not None:
                pending.update(item.block_ids[item.request.num_computed_tokens // bs :])
        for n, block in enumerate(hits):
            if block.block_id in pending:
                return hits[:n]
        return hits

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(req, num_new, self.kv_cache.block_ids(req.request_id))

    def _preempt(self, req: Request) -> None:
        self.kv_cache.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(
        self, sched: SchedulerOutput, runner_output: RunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        by_request = runner_output.by_request
        done = [(item, by_request[item.request.request_id]) for item in sched.scheduled]
        if runner_output.background is not None:
            item, self.in_flight = self.in_flight, None
            status, self._in_flight_finish = self._in_flight_finish, None
            if status is not None:  # aborted while it ran: its blocks are free to go now
                item.request.status = status
                self._free(item.request)
            else:
                self.running.append(item.request)
                done.append((item, runner_output.background))
        for item, sampled in done:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            out = EngineCoreOutput(
                req.request_id,
                [],
                new_prompt_logprobs=sampled.prompt_logprobs,
                num_cached_tokens=max(req.num_cached_tokens, 0),
            )
            if sampled.token_id is not None:
                req.append_output_token(sampled.token_id)
                out.new_token_ids.append(sampled.token_id)
                if sampled.logprobs is not None:
                    out.new_logprobs = [sampled.logprobs]
                if self._check_stop(req):
                    self.running.remove(req)
                    self._free(req)
                    out.finish_reason = req.status.finish_reason
                    out.stop_reason = req.stop_reason
            if out.new_token_ids or out.new_prompt_logprobs is not None or out.finish_reason:
                outputs.append(out)
        return outputs

    def _check_stop(self, req: Request) -> bool:
        params = req.sampling_params
        token = req.output_token_ids[-1]
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                return True
            if token in params.stop_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = token
                return True
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _free(self, req: Request) -> None:
        self.kv_cache.free(req)
        del self.requests[req.request_id]
        self._finished_since_step.append(req.request_id)
