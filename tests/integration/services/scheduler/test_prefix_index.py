"""The prefix-cache index on a real Redis: events in, per-worker prefix lengths out, and
nothing breaks while Redis is away."""

import asyncio

import pytest

from tandem.engine.block_pool import KVEventKind
from tandem.services.scheduler.prefix_index import PrefixIndex
from tandem.services.servers import free_port, start_redis

STORED, REMOVED, CLEARED = KVEventKind.STORED, KVEventKind.REMOVED, KVEventKind.CLEARED
CHAIN = [2**64 - 1 - i for i in range(6)]  # full 64-bit hashes survive the round trip


@pytest.fixture()
def redis_server():
    server = start_redis()
    yield server
    server.stop()


def test_lookup_counts_each_workers_leading_blocks(redis_server):
    async def scenario():
        index = PrefixIndex(redis_server.url)
        await index.apply("p0", [(STORED, h) for h in CHAIN[:4]])
        await index.apply("d0", [(STORED, h) for h in CHAIN])
        await index.apply("p1", [(STORED, h) for h in CHAIN[1:]])  # lacks the first block
        got = await index.lookup(CHAIN)
        await index.apply("d0", [(REMOVED, CHAIN[2])])
        after_evict = await index.lookup(CHAIN)
        holders = await index.holders(CHAIN[2])
        await index.apply("p0", [(CLEARED, 0)])
        after_clear = await index.lookup(CHAIN)
        await index.drop_worker("d0")
        after_drop = await index.lookup(CHAIN)
        await index.close()
        return got, after_evict, holders, after_clear, after_drop

    got, after_evict, holders, after_clear, after_drop = asyncio.run(scenario())
    assert got == {"p0": 4, "d0": 6}
    assert after_evict == {"p0": 4, "d0": 2} and holders == {"p0", "p1"}
    assert after_clear == {"d0": 2}
    assert after_drop == {}


def test_full_resync_replaces_a_workers_entries(redis_server):
    async def scenario():
        index = PrefixIndex(redis_server.url)
        await index.apply("w", [(STORED, h) for h in CHAIN])
        await index.apply("w", [(STORED, CHAIN[0])], full_resync=True)
        got = await index.lookup(CHAIN)
        await index.close()
        return got

    assert asyncio.run(scenario()) == {"w": 1}


def test_redis_down_costs_no_error_and_recovers():
    port = free_port()
    server = start_redis(port)

    async def scenario():
        index = PrefixIndex(server.url)
        await index.apply("w", [(STORED, h) for h in CHAIN])
        server.stop()
        down = await index.lookup(CHAIN), index.available
        await index.apply("w", [(REMOVED, CHAIN[0])])  # dropped, no exception
        restarted = start_redis(port)
        try:
            back = await index.ping()
            await index.apply("w", [(STORED, CHAIN[0])], full_resync=True)
            after = await index.lookup(CHAIN)
        finally:
            await index.close()
            restarted.stop()
        return down, back, after

    (lookup_down, available), back, after = asyncio.run(scenario())
    assert lookup_down == {} and not available
    assert back and after == {"w": 1}
