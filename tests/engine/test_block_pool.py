"""Block pool and KV cache manager: ref counts, eviction order, hash chaining."""

from __future__ import annotations

import pytest

from metroline.engine.core.kv_cache import BlockPool, KVCacheManager, block_hash, root_hash
from metroline.engine.core.request import Request
from metroline.engine.messages import EngineCoreRequest
from metroline.engine.sampling_params import SamplingParams


def _request(request_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(EngineCoreRequest(request_id, tokens, SamplingParams(), cache_salt=salt))


def test_allocate_and_release_ref_counts():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    pool.touch(blocks[:1])
    assert blocks[0].ref_cnt == 2
    pool.release(blocks)
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 3
    pool.release(blocks[:1])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.release(blocks[:1])
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_eviction_prefers_plain_blocks_then_least_recently_freed():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.cache(a, b"ha", (1,))
    pool.cache(b, b"hb", (2,))
    pool.release([a])  # cached, freed first
    pool.release([b])  # cached, freed second
    pool.release([c])  # plain: jumps to the front
    assert [blk.block_id for blk in pool.allocate(1)] == [c.block_id]
    first, second = pool.allocate(2)
    assert (first, second) == (a, b)
    assert first.block_hash is None and b"ha" not in pool.by_hash
    assert pool.num_evictions == 2
    assert d.ref_cnt == 1


def test_lookup_requires_matching_tokens():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache(block, b"h", (1, 2))
    assert pool.lookup(b"h", (1, 2)) is block
    assert pool.lookup(b"h", (1, 3)) is None  # a colliding hash never serves wrong KV
    assert pool.lookup(b"x", (1, 2)) is None


def test_hash_chain_depends_on_parent_and_salt():
    tokens = list(range(16))
    root = root_hash(None)
    first = block_hash(root, tokens)
    assert block_hash(root, tokens) == first
    assert block_hash(first, tokens) != first  # same tokens, different parent
    assert block_hash(root_hash("other"), tokens) != first
    assert block_hash(root, [*tokens[:-1], 99]) != first


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = _request("a", list(range(10)))
    hits, n = kv.get_computed_blocks(first)
    assert (hits, n) == ([], 0)
    assert len(kv.allocate_slots(first, 10)) == 3
    first.num_computed_tokens = 10
    # 10 tokens: blocks 0 and 1 are full and cached; block 2 is partial.
    second = _request("b", [*list(range(8)), 77, 78, 79])
    shared, n = kv.get_computed_blocks(second)
    assert n == 8 and [b.block_id for b in shared] == kv.block_ids(first)[:2]
    kv.allocate_slots(second, 3, shared)
    assert [b.ref_cnt for b in shared] == [2, 2]
    # Exactly-full prompt: the last block is recomputed, never shared for writing.
    third = _request("c", list(range(8)))
    assert kv.get_computed_blocks(third)[1] == 4
    kv.free(first)
    kv.free(second)
    assert [b.ref_cnt for b in shared] == [0, 0]
    assert kv.pool.num_free_blocks == 16
    # Freed cached blocks stay reusable until evicted.
    again = _request("d", list(range(9)))
    assert kv.get_computed_blocks(again)[1] == 8


def test_allocate_slots_returns_none_without_side_effects():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    big = _request("big", list(range(13)))
    assert kv.allocate_slots(big, 13) is None
    assert kv.pool.num_free_blocks == 3 and kv.block_ids(big) == []
    small = _request("small", list(range(5)))
    assert len(kv.allocate_slots(small, 5)) == 2
    assert kv.allocate_slots(small, 0) == []


def test_hits_in_free_queue_count_against_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    first = _request("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(first, 5)
    kv.free(first)  # blocks [1,2] and [3,4] cached and free; [5] plain and free
    second = _request("b", [1, 2, 3, 4, 9, 9, 9])
    hits, n = kv.get_computed_blocks(second)
    assert n == 4
    # Needs 4 blocks: 2 hits (taken from the free queue) + 2 new, but only 1 stays free.
    assert kv.allocate_slots(second, 3, hits) is None
    assert all(b.ref_cnt == 0 for b in hits) and kv.pool.num_free_blocks == 3


def test_salted_requests_share_only_with_same_salt_when_caching_is_off():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    tokens = list(range(9))
    a = _request("a", tokens, salt="parent")
    kv.allocate_slots(a, 9)
    assert kv.get_computed_blocks(_request("b", tokens, salt="parent"))[1] == 8
    assert kv.get_computed_blocks(_request("c", tokens, salt="other"))[1] == 0
    assert kv.get_computed_blocks(_request("d", tokens))[1] == 0
    assert kv.prefix_cache_queries == 0  # statistics count prefix caching proper only


def test_trim_returns_the_slots_past_the_kept_tokens():
    """Slots allocated for speculative tokens beyond the real ones are never hashed, and
    ``trim`` gives back the blocks the kept tokens do not need (never a cached one)."""
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    request = _request("a", list(range(6)))
    kv.allocate_slots(request, 6 + 5)  # 6 real tokens + 5 speculative slots: 3 blocks
    assert len(kv.block_ids(request)) == 3 and kv.num_cached_blocks["a"] == 1
    kv.trim(request, 7)  # 6 real tokens and one accepted: 2 blocks
    assert len(kv.block_ids(request)) == 2 and kv.pool.num_free_blocks == 6
    kv.trim(request, 8)  # nothing to give back
    assert len(kv.block_ids(request)) == 2
    with pytest.raises(ValueError, match="prefix-cached"):
        kv.trim(request, 0)  # the first block (4 real tokens) is cached
    kv.free(request)
    assert kv.pool.num_free_blocks == 8
