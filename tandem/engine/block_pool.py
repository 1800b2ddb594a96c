"""Paged KV blocks with prefix caching. Pure Python: ints, dicts, lists.

A block is identified by its id (its index in the KV cache tensors). A full block whose
tokens are known carries a `block_hash`, chained over its parent's hash, so equal hashes
mean equal prefixes. Freed blocks keep their hash and sit in an LRU free queue; they are
evicted (hash dropped) lazily, only when the queue hands them out again.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NONE_HASH = 0  # the parent hash of a request's first block when it has no salt


def root_hash(cache_salt: str | None) -> int:
    """Parent hash of a request's first block: a tenant's salt separates its cache entries."""
    if not cache_salt:
        return NONE_HASH
    return _digest(b"salt:" + cache_salt.encode())


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Stable 64-bit chained hash of one full block (same across processes and machines)."""
    payload = struct.pack(f"<Q{len(token_ids)}q", parent_hash, *token_ids)
    return _digest(payload)


def _digest(payload: bytes) -> int:
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def extend_block_hashes(
    block_hashes: list[int], token_ids: Sequence[int], block_size: int, cache_salt: str | None
) -> None:
    """Append hashes for every full block of `token_ids` not hashed yet."""
    num_full = len(token_ids) // block_size
    parent = block_hashes[-1] if block_hashes else root_hash(cache_salt)
    for i in range(len(block_hashes), num_full):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size])
        block_hashes.append(parent)


class KVEventKind(enum.Enum):
    STORED = "stored"  # a full block entered the prefix cache
    REMOVED = "removed"  # it was evicted
    CLEARED = "cleared"  # the whole prefix cache was reset


@dataclass(frozen=True, slots=True)
class KVCacheEvent:
    """A change to the prefix cache, for the cluster-wide index."""

    kind: KVEventKind
    block_hash: int = 0
    parent_hash: int = 0


class Block:
    """One KV block: its id, how many requests use it, and its hash once full and cached."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """All KV blocks, the free queue (LRU first) and the hash -> block prefix cache.

    Contract: every block is either in use (ref_cnt > 0, not in the free queue) or free
    (ref_cnt == 0, in the free queue); a hashed block is reachable from `cached` by its hash.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the first key is evicted first. O(1) everywhere.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, Block] = {}
        self.num_evicted = 0
        self.events: list[KVCacheEvent] | None = None  # None: nobody listens

    def enable_events(self) -> None:
        """Record KVCacheEvents from now on (a worker publishes them; see take_events)."""
        self.events = []

    def take_events(self) -> list[KVCacheEvent]:
        """The events recorded since the last call."""
        if not self.events:
            return []
        events, self.events = self.events, []
        return events

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: int) -> Block | None:
        """The cached block holding `block_hash`, or None."""
        return self.cached.get(block_hash)

    def allocate(self, num: int) -> list[Block]:
        """Take `num` blocks off the free queue (evicting their cached hashes), ref_cnt 1."""
        if num > len(self.free_queue):
            raise ValueError(f"cannot allocate {num} blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(num):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones off the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the queue in this order.

        Callers pass a request's blocks tail first, so its last blocks are evicted first.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    self._evict(block)
                self.free_queue[block.block_id] = None

    def cache_full_block(self, block: Block, block_hash: int, parent_hash: int = 0) -> None:
        """Record that `block` holds the full block `block_hash` (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # another block already holds these tokens; keep that one canonical
        block.block_hash = block_hash
        self.cached[block_hash] = block
        if self.events is not None:
            self.events.append(KVCacheEvent(KVEventKind.STORED, block_hash, parent_hash))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (False) while any block is in use."""
        if len(self.free_queue) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        if self.events is not None:
            self.events.append(KVCacheEvent(KVEventKind.CLEARED))
        return True

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                self.num_evicted += 1
                if self.events is not None:
                    self.events.append(KVCacheEvent(KVEventKind.REMOVED, block.block_hash))
            block.block_hash = None

    def check_integrity(self) -> None:
        """Raise AssertionError-like RuntimeError if the pool's invariants do not hold."""
        num_used = 0
        for block in self.blocks:
            if block.ref_cnt < 0:
                raise RuntimeError(f"negative ref count: {block}")
            in_queue = block.block_id in self.free_queue
            if (block.ref_cnt == 0) != in_queue:
                raise RuntimeError(f"free queue disagrees with ref count: {block}")
            num_used += block.ref_cnt > 0
            if block.block_hash is not None and self.cached.get(block.block_hash) is not block:
                raise RuntimeError(f"hashed block missing from the cache map: {block}")
        if num_used + len(self.free_queue) != self.num_blocks:
            raise RuntimeError("free + used != total")
        for block_hash, block in self.cached.items():
            if block.block_hash != block_hash:
                raise RuntimeError(f"cache map points at a block with another hash: {block}")
