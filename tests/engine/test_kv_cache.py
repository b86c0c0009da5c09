"""KV block pool: allocation, prefix-cache hits, reference counts, LRU eviction."""

from __future__ import annotations

from twinfer.engine.kv_cache import KVCacheManager, hash_block
from twinfer.engine.request import Request
from twinfer.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), frozenset({0}), max_tokens=16)


def assert_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.blocks)
    assert not kv.req_blocks


def test_allocate_and_free_returns_every_block() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    req = make_request("a", list(range(1, 11)))  # 10 tokens -> 3 blocks
    assert kv.allocate_slots(req, 10)
    assert len(kv.block_ids("a")) == 3
    assert kv.num_free_blocks == 5
    kv.free(req)
    assert_all_free(kv)


def test_allocation_fails_cleanly_when_full() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    req = make_request("a", list(range(1, 11)))
    assert not kv.allocate_slots(req, 10)
    assert_all_free(kv)


def test_prefix_hit_shares_blocks_and_leaves_last_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(1, 13)))  # exactly 3 full blocks
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    b = make_request("b", list(range(1, 13)))
    hits, n = kv.get_computed_blocks(b)
    # The last token must be recomputed for its logits: only 2 of 3 blocks may hit.
    assert n == 8 and [h.block_id for h in hits] == kv.block_ids("a")[:2]
    assert kv.allocate_slots(b, 4, hits)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert all(kv.blocks[i].ref_cnt == 2 for i in kv.block_ids("a")[:2])
    kv.free(a)
    kv.free(b)
    assert_all_free(kv)


def test_freed_blocks_stay_cached_until_evicted() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(1, 10)))  # 2 full blocks + 1 token
    assert kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9  # the step ran
    kv.free(a)
    again = make_request("a2", list(range(1, 10)))
    hits, n = kv.get_computed_blocks(again)
    assert n == 8
    # A request that needs the whole pool evicts the cached blocks.
    big = make_request("big", list(range(100, 116)))
    assert kv.allocate_slots(big, 16)
    assert not kv.cached or all(b.ref_cnt == 1 for b in kv.blocks)
    kv.free(big)
    hits, n = kv.get_computed_blocks(make_request("a3", list(range(1, 10))))
    assert n == 0
    assert_all_free(kv)


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    first = hash_block(None, [1, 2, 3, 4])
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(
        hash_block(None, [9, 2, 3, 4]), [5, 6, 7, 8]
    )
    assert hash_block(None, [1, 2, 3, 4]) == first


def test_disabled_prefix_caching_never_hits() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(1, 13)))
    assert kv.allocate_slots(a, 12)
    kv.free(a)
    assert kv.get_computed_blocks(make_request("b", list(range(1, 13)))) == ([], 0)
    assert_all_free(kv)


def test_blocks_never_computed_are_not_left_in_the_cache() -> None:
    # A step that was scheduled but never ran (exception, abort) must not leave names behind.
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request("a", list(range(1, 14)))
    assert kv.allocate_slots(a, 13)  # names 3 full blocks at scheduling time
    kv.free(a)  # num_computed_tokens is still 0: nothing was written
    assert kv.get_computed_blocks(make_request("b", list(range(1, 14)))) == ([], 0)
    assert_all_free(kv)
