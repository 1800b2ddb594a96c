"""The cluster-wide prefix-cache index in Redis: for each block hash, which workers hold it.

Keys: `tandem:kv:<hash>` is the set of worker ids holding that block; `tandem:kvw:<worker>`
is the set of hashes a worker holds (so a worker's entries can be dropped at once). A
lookup walks a request's chain of block hashes in one server-side script and returns, per
worker, how many leading blocks it holds.

Redis being away never fails a request: writes and lookups are skipped (lookups return no
overlap, so routing falls back to load alone), the outage is logged once, and `available`
tells the owner to rebuild the index from the workers when Redis is back.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import redis.asyncio as redis
from redis.exceptions import RedisError

from tandem.engine.block_pool import KVEventKind

logger = logging.getLogger(__name__)

BLOCK_KEY = "tandem:kv:"
WORKER_KEY = "tandem:kvw:"

# KEYS: the block keys of a hash chain, in order. Returns [worker, count, worker, count...]:
# each worker that holds the first `count` blocks (and not block count + 1).
_LOOKUP = """
local counts = {}
local alive = nil
for i, key in ipairs(KEYS) do
  local members = redis.call('SMEMBERS', key)
  local next_alive = {}
  local any = false
  for _, w in ipairs(members) do
    if alive == nil or alive[w] then
      next_alive[w] = true
      counts[w] = i
      any = true
    end
  end
  if not any then break end
  alive = next_alive
end
local out = {}
for w, c in pairs(counts) do
  table.insert(out, w)
  table.insert(out, c)
end
return out
"""


class PrefixIndex:
    """Which workers hold which blocks. Every method survives Redis being down."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._lookup = self.redis.register_script(_LOOKUP)
        self.available = True
        self.lookup_seconds: deque[float] = deque(maxlen=1000)  # recent lookups, for stats
        self.num_lookups = 0

    def _down(self, e: Exception) -> None:
        if self.available:
            logger.warning("Redis at %s unreachable (%s): routing on load alone", self.url, e)
        self.available = False

    async def ping(self) -> bool:
        """True when Redis answers; flips `available` back on (the caller then resyncs)."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            self._down(e)
            return False
        if not self.available:
            logger.info("Redis at %s is back", self.url)
        self.available = True
        return True

    async def apply(self, worker_id: str, events, full_resync: bool = False) -> None:
        """Apply one worker's events ((kind, block_hash) pairs, in order) in one round trip.
        A full resync first forgets everything the worker was said to hold."""
        if not self.available:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if full_resync:
                    await self._drop(pipe, worker_id)
                for kind, block_hash in events:
                    if kind is KVEventKind.STORED:
                        pipe.sadd(f"{BLOCK_KEY}{block_hash}", worker_id)
                        pipe.sadd(f"{WORKER_KEY}{worker_id}", block_hash)
                    elif kind is KVEventKind.REMOVED:
                        pipe.srem(f"{BLOCK_KEY}{block_hash}", worker_id)
                        pipe.srem(f"{WORKER_KEY}{worker_id}", block_hash)
                    else:
                        await self._drop(pipe, worker_id)
                await pipe.execute()
        except (RedisError, OSError) as e:
            self._down(e)

    async def _drop(self, pipe, worker_id: str) -> None:
        """Queue on `pipe` the removal of every entry of `worker_id` (read first)."""
        hashes = await self.redis.smembers(f"{WORKER_KEY}{worker_id}")
        for block_hash in hashes:
            pipe.srem(f"{BLOCK_KEY}{int(block_hash)}", worker_id)
        pipe.delete(f"{WORKER_KEY}{worker_id}")

    async def drop_worker(self, worker_id: str) -> None:
        """Forget a worker (it stopped heartbeating)."""
        if not self.available:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._drop(pipe, worker_id)
                await pipe.execute()
        except (RedisError, OSError) as e:
            self._down(e)

    async def lookup(self, block_hashes: list[int]) -> dict[str, int]:
        """{worker_id: number of leading blocks of the chain it holds}, in one round trip.
        Empty when Redis is away or no worker holds the first block."""
        if not block_hashes or not self.available:
            return {}
        start = time.perf_counter()
        try:
            flat = await self._lookup(keys=[f"{BLOCK_KEY}{h}" for h in block_hashes])
        except (RedisError, OSError) as e:
            self._down(e)
            return {}
        self.lookup_seconds.append(time.perf_counter() - start)
        self.num_lookups += 1
        return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def holders(self, block_hash: int) -> set[str]:
        """The workers holding one block (for checks and tests)."""
        members = await self.redis.smembers(f"{BLOCK_KEY}{block_hash}")
        return {m.decode() for m in members}

    async def close(self) -> None:
        await self.redis.aclose()
