import random

import pytest

from tandem.engine.block_pool import BlockPool, extend_block_hashes, hash_block_tokens, root_hash
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, SamplingParams


def test_block_hash_is_stable_and_chained():
    a = hash_block_tokens(0, [1, 2, 3, 4])
    # A fixed value: the hash must be the same in every process and on every machine.
    assert a == hash_block_tokens(0, [1, 2, 3, 4])
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(0, [5, 6, 7, 8])
    assert root_hash("tenant-a") != root_hash("tenant-b") != root_hash(None)


def test_block_hash_is_identical_across_processes():
    import subprocess
    import sys

    code = "from tandem.engine.block_pool import hash_block_tokens as h; print(h(0, [1, 2, 3]))"
    out = {subprocess.check_output([sys.executable, "-c", code], text=True) for _ in range(2)}
    assert out == {f"{hash_block_tokens(0, [1, 2, 3])}\n"}


def test_free_queue_evicts_least_recently_freed_first_and_lazily():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_full_block(a, 111)
    pool.cache_full_block(b, 222)
    pool.free([b, a])  # tail first
    pool.check_integrity()
    assert pool.lookup(111) is a and pool.lookup(222) is b  # still cached while free
    # Blocks 2 and 3 were never used and come first, then b (freed first), then a.
    taken = pool.allocate(3)
    assert [blk.block_id for blk in taken] == [2, 3, b.block_id]
    assert pool.lookup(222) is None and pool.lookup(111) is a
    pool.touch([a])  # a prefix hit takes a back off the free queue
    assert pool.num_free_blocks == 0
    pool.check_integrity()
    with pytest.raises(ValueError):
        pool.allocate(1)


def test_double_free_is_refused():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(RuntimeError):
        pool.free([a])


def _request(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_randomized_operations_keep_integrity_and_leak_nothing():
    rng = random.Random(7)
    kv = KVCacheManager(num_blocks=40, block_size=4)
    live: dict[str, Request] = {}
    prefixes = [[rng.randrange(100) for _ in range(12)] for _ in range(3)]
    for step in range(600):
        op = rng.random()
        if op < 0.45 or not live:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 12)] + [
                rng.randrange(100) for _ in range(rng.randrange(1, 10))
            ]
            req = _request(f"r{step}", prompt)
            hits, num_hit = kv.get_computed_blocks(req)
            assert num_hit < req.num_tokens
            if kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None:
                req.num_computed_tokens = req.num_tokens
                live[req.request_id] = req
        elif op < 0.8:
            req = live[rng.choice(sorted(live))]
            req.append_output_token(rng.randrange(100))
            if kv.allocate_slots(req, 1) is not None:
                req.num_computed_tokens += 1
            else:
                kv.free(live.pop(req.request_id))
        else:
            kv.free(live.pop(rng.choice(sorted(live))))
        kv.check_integrity()
    for req in list(live.values()):
        kv.free(req)
    kv.check_integrity()
    assert kv.num_free_blocks == 40


def test_prefix_hit_reuses_blocks_and_caps_at_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = _request("a", list(range(8)))
    kv.allocate_slots(a, 8)
    b = _request("b", list(range(8)))
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4  # the last full block is recomputed: its last token's logits are needed
    c = _request("c", list(range(9)))
    hits, num_hit = kv.get_computed_blocks(c)
    assert num_hit == 8 and [h.block_id for h in hits] == kv.block_ids("a")


def test_cache_salt_separates_tenants():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = Request("a", list(range(9)), SamplingParams(), cache_salt="t1")
    kv.allocate_slots(a, 9)
    b = Request("b", list(range(9)), SamplingParams(), cache_salt="t2")
    assert kv.get_computed_blocks(b)[1] == 0
    c = Request("c", list(range(9)), SamplingParams(), cache_salt="t1")
    assert kv.get_computed_blocks(c)[1] == 8


def test_extend_block_hashes_only_full_blocks():
    hashes: list[int] = []
    extend_block_hashes(hashes, list(range(10)), 4, None)
    assert len(hashes) == 2
    extend_block_hashes(hashes, list(range(12)), 4, None)
    assert len(hashes) == 3


def test_kv_events_report_stores_evictions_and_resets():
    from tandem.engine.block_pool import KVCacheEvent, KVEventKind

    pool = BlockPool(2)
    assert pool.take_events() == []  # off until enabled
    pool.enable_events()
    a, b = pool.allocate(2)
    pool.cache_full_block(a, 11, parent_hash=0)
    pool.cache_full_block(b, 22, parent_hash=11)
    pool.cache_full_block(b, 33)  # already hashed: no event
    assert pool.take_events() == [
        KVCacheEvent(KVEventKind.STORED, 11, 0),
        KVCacheEvent(KVEventKind.STORED, 22, 11),
    ]
    pool.free([b, a])
    (c,) = pool.allocate(1)  # evicts the least recent: b
    assert pool.take_events() == [KVCacheEvent(KVEventKind.REMOVED, 22)]
    pool.free([c])
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [KVCacheEvent(KVEventKind.CLEARED)]
    pool.check_integrity()
