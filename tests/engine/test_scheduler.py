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
