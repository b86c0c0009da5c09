"""The scheduler on fake runner outputs: budgets, chunking, preemption, stop rules."""

from __future__ import annotations

import random

import pytest

from twinfer.engine.kv_cache import KVCacheManager
from twinfer.engine.request import Request, RequestStatus
from twinfer.engine.scheduler import RunnerOutput, SampledToken, Scheduler
from twinfer.sampling_params import SamplingParams

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=128):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
    return Scheduler(kv, max_num_seqs, budget, max_model_len)


def make_request(rid, prompt_len, max_tokens=8, **params) -> Request:
    tokens = [random.Random(rid).randrange(1, 100) for _ in range(prompt_len)]
    return Request(
        rid, tokens, SamplingParams(max_tokens=max_tokens, **params), frozenset({EOS}), max_tokens
    )


def run_step(sched: Scheduler, next_token=lambda req: 7):
    out = sched.schedule()
    by_request = {}
    for item in out.scheduled:
        req = item.request
        done = req.num_computed_tokens + item.num_new_tokens == req.num_tokens
        by_request[req.request_id] = SampledToken(next_token(req) if done else None)
    return out, sched.update_from_output(out, RunnerOutput(by_request))


def run_to_completion(sched: Scheduler, next_token=lambda req: 7, max_steps=1000):
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        steps.append(run_step(sched, next_token))
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks
    return steps


def test_budget_chunks_a_long_prompt() -> None:
    sched = make_scheduler(budget=8)
    req = make_request("a", 20, max_tokens=2)
    sched.add_request(req)
    steps = run_to_completion(sched)
    assert [s.total_num_scheduled_tokens for s, _ in steps] == [8, 8, 4, 1]
    assert req.output_token_ids == [7, 7]
    assert req.status == RequestStatus.FINISHED_LENGTH


def test_decodes_go_first_and_new_requests_share_the_budget() -> None:
    sched = make_scheduler(budget=10)
    sched.add_request(make_request("a", 6, max_tokens=4))
    out, _ = run_step(sched)
    sched.add_request(make_request("b", 30, max_tokens=4))
    out, _ = run_step(sched)
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 9)]
    run_to_completion(sched)


def test_max_num_seqs_caps_the_running_set() -> None:
    sched = make_scheduler(max_num_seqs=2, budget=100)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", 3))
    out, _ = run_step(sched)
    assert len(out.scheduled) == 2
    assert sched.num_waiting == 3
    run_to_completion(sched)


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    # 6 blocks of 4 tokens; three requests of 8 prompt + 8 output tokens need 12 blocks at once.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    reqs = [make_request(f"r{i}", 8, max_tokens=8) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    steps = run_to_completion(sched)
    assert any(s.preempted_req_ids for s, _ in steps)
    assert sum(r.num_preemptions for r in reqs) > 0
    assert all(len(r.output_token_ids) == 8 for r in reqs)


def test_eos_stops_unless_ignored_and_min_tokens_holds_it() -> None:
    sched = make_scheduler()
    stop = make_request("stop", 4, max_tokens=8)
    ignore = make_request("ignore", 4, max_tokens=3, ignore_eos=True)
    held = make_request("held", 4, max_tokens=8, min_tokens=2)
    stop_id = make_request("stopid", 4, max_tokens=8, stop_token_ids=[7])
    for r in (stop, ignore, held):
        sched.add_request(r)
    run_to_completion(sched, next_token=lambda req: EOS)
    assert stop.output_token_ids == [EOS] and stop.status == RequestStatus.FINISHED_STOPPED
    assert ignore.output_token_ids == [EOS] * 3 and ignore.status == RequestStatus.FINISHED_LENGTH
    assert held.output_token_ids == [EOS, EOS]
    sched.add_request(stop_id)
    run_to_completion(sched)
    assert stop_id.stop_reason == 7 and stop_id.output_token_ids == [7]


def test_max_model_len_ends_generation() -> None:
    sched = make_scheduler(max_model_len=10)
    req = make_request("a", 6, max_tokens=100)
    sched.add_request(req)
    run_to_completion(sched)
    assert req.num_tokens == 10 and req.status == RequestStatus.FINISHED_LENGTH


def test_abort_frees_blocks_waiting_or_running() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", 5), make_request("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    sched.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks
    out = sched.schedule()
    assert out.is_empty and sorted(out.finished_req_ids) == ["a", "b"]


def test_duplicate_request_id_is_rejected() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a", 3))
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)


def test_random_workload_keeps_the_pool_consistent() -> None:
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=20, block_size=4, max_num_seqs=6, budget=16)
    for i in range(30):
        sched.add_request(
            make_request(f"r{i}", rng.randrange(1, 30), max_tokens=rng.randrange(1, 12))
        )
    run_to_completion(sched, next_token=lambda req: rng.randrange(1, 100), max_steps=5000)


# ---- background prefill: streamed prompt chunks run beside the steps ----


def background_scheduler(min_tokens=8, **kw) -> Scheduler:
    sched = make_scheduler(**kw)
    sched.runs_in_background = lambda n: n >= min_tokens
    return sched


def run_step_bg(sched: Scheduler, finish_after: int, state: dict) -> tuple:
    """A step with a fake runner whose background chunk finishes `finish_after` steps after it
    started (0: within the step that starts it)."""
    out = sched.schedule()
    by_request = {}
    for item in out.scheduled:
        req = item.request
        done = req.num_computed_tokens + item.num_new_tokens == req.num_tokens
        by_request[req.request_id] = SampledToken(7 if done else None)
    if out.background is not None:
        state["left"] = finish_after
        state["item"] = out.background
    background = None
    if out.background_in_flight:
        if state["left"] == 0 or not out.scheduled:  # nothing else to do: the runner waits
            item = state["item"]
            req = item.request
            done = req.num_computed_tokens + item.num_new_tokens == req.num_tokens
            background = SampledToken(7 if done else None)
        else:
            state["left"] -= 1
    return out, sched.update_from_output(out, RunnerOutput(by_request, background))


def test_long_prompt_chunks_run_in_the_background_while_decodes_step() -> None:
    sched = background_scheduler(min_tokens=8, budget=16)
    sched.add_request(make_request("d", 3, max_tokens=20))
    state: dict = {}
    run_step_bg(sched, 3, state)  # d's prompt (3 tokens) in the foreground
    sched.add_request(make_request("long", 40, max_tokens=2))
    out, _ = run_step_bg(sched, 3, state)
    assert out.background.request.request_id == "long"
    assert out.background.num_new_tokens == 16  # one budget's worth, outside the budget
    assert [i.request.request_id for i in out.scheduled] == ["d"]
    # While the chunk runs, d decodes every step and "long" is not scheduled again.
    for _ in range(3):
        out, _ = run_step_bg(sched, 3, state)
        assert [i.request.request_id for i in out.scheduled] == ["d"]
        assert out.background_in_flight
        assert sched.num_running == 2
    chunks = []
    for _ in range(40):
        out, _ = run_step_bg(sched, 3, state)
        if out.background is not None:
            chunks.append(out.background.num_new_tokens)
        if not sched.has_unfinished_requests():
            break
    assert chunks == [16, 8]  # the last 8 tokens: still at the threshold
    assert sched.requests == {}
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks


def test_short_tail_and_prompt_logprobs_stay_in_the_foreground() -> None:
    sched = background_scheduler(min_tokens=8, budget=16)
    sched.add_request(make_request("a", 20, max_tokens=1))
    sched.add_request(make_request("lp", 12, max_tokens=1, prompt_logprobs=1))
    state: dict = {}
    out, _ = run_step_bg(sched, 0, state)
    assert out.background.request.request_id == "a"
    assert [(i.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("lp", 12)]
    out, _ = run_step_bg(sched, 0, state)
    assert out.background is None  # a's last 4 tokens are below the threshold
    assert ("a", 4) in [(i.request.request_id, i.num_new_tokens) for i in out.scheduled]
    for _ in range(10):
        if not sched.has_unfinished_requests():
            break
        run_step_bg(sched, 0, state)
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks


def test_abort_of_a_running_chunk_frees_its_blocks_when_it_finishes() -> None:
    sched = background_scheduler(min_tokens=8, budget=16)
    sched.add_request(make_request("d", 3, max_tokens=50))
    sched.add_request(make_request("long", 40, max_tokens=2))
    state: dict = {}
    run_step_bg(sched, 5, state)  # d's prompt and the first chunk of "long"
    used = sched.kv_cache.num_blocks - sched.kv_cache.num_free_blocks
    sched.finish_requests(["long"], RequestStatus.FINISHED_ABORTED)
    assert "long" in sched.requests  # the chunk still writes its blocks
    assert sched.kv_cache.num_blocks - sched.kv_cache.num_free_blocks == used
    for _ in range(6):
        run_step_bg(sched, 5, state)
    assert "long" not in sched.requests and sched.in_flight is None
    sched.finish_requests(["d"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks


def test_preemption_never_takes_the_running_chunk() -> None:
    sched = background_scheduler(min_tokens=8, num_blocks=12, block_size=4, budget=16)
    sched.add_request(make_request("long", 32, max_tokens=1))
    sched.add_request(make_request("d", 4, max_tokens=30))
    state: dict = {}
    out, _ = run_step_bg(sched, 100, state)
    assert out.background.request.request_id == "long"
    preempted = []
    for _ in range(30):  # d grows until blocks run out; only d itself can be preempted
        out, _ = run_step_bg(sched, 100, state)
        preempted += out.preempted_req_ids
        if not out.scheduled:  # nothing else to run: the chunk completes now
            break
        assert sched.in_flight is not None
    assert preempted == ["d"]
    for _ in range(100):
        if not sched.has_unfinished_requests():
            break
        run_step_bg(sched, 100, state)
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks


def test_prefix_hits_stop_at_blocks_a_running_chunk_has_not_written() -> None:
    sched = background_scheduler(min_tokens=8, budget=16, block_size=4)
    sched.add_request(make_request("d", 3, max_tokens=20))  # keeps the foreground busy
    first = make_request("a", 24, max_tokens=1)
    sched.add_request(first)
    state: dict = {}
    out, _ = run_step_bg(sched, 10, state)  # a's first 16 tokens in flight
    twin = Request("b", list(first.prompt_token_ids), SamplingParams(max_tokens=1), {EOS}, 1)
    sched.add_request(twin)
    run_step_bg(sched, 10, state)
    assert twin.num_cached_tokens == 0  # a's 4 cached blocks are not written yet
    assert twin.num_computed_tokens == 15  # the rest of the budget, computed by b itself
    for _ in range(40):
        if not sched.has_unfinished_requests():
            break
        run_step_bg(sched, 10, state)
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks
