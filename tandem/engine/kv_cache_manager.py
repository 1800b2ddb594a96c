"""Per-request KV block tables over a BlockPool: prefix lookup, slot allocation, freeing."""

from __future__ import annotations

from tandem.engine.block_pool import Block, BlockPool, extend_block_hashes, root_hash
from tandem.engine.request import Request


class KVCacheManager:
    """Maps each request to its blocks. Pure Python; the scheduler is its only caller."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[Block]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks already in pool.cached
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """Longest cached prefix of a new request: (blocks, number of tokens they hold).

        At least one token is always left to compute, since its logits give the next token.
        A request asking for prompt logprobs computes its whole prompt (as in vLLM).
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, request.prefix_salt
        )
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[Block] = ()
    ) -> list[Block] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` are prefix hits from get_computed_blocks (new requests only).
        Returns the newly allocated blocks, or None (and changes nothing) when too few are free.
        """
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_needed - len(blocks) - len(new_computed_blocks)
        # Hits sitting in the free queue stop being free once touched.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_evictable_hits > self.pool.num_free_blocks:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        self.num_cached_blocks.setdefault(request.request_id, 0)
        self.num_cached_blocks[request.request_id] += len(new_computed_blocks)
        new_blocks = self.pool.allocate(max(num_new_blocks, 0))
        blocks.extend(new_blocks)
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Publish each block that `num_tokens` fills: its tokens are known even before its
        KV is written, and this step's forward writes every KV before reading any."""
        if not self.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_cached_blocks[request.request_id]
        if num_full <= start:
            return
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, request.prefix_salt
        )
        blocks = self.req_to_blocks[request.request_id]
        hashes = request.block_hashes
        for i in range(start, num_full):
            parent = hashes[i - 1] if i else root_hash(request.prefix_salt)
            self.pool.cache_full_block(blocks[i], hashes[i], parent)
        self.num_cached_blocks[request.request_id] = num_full

    def trim(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past those `num_tokens` tokens need (slots that held
        rejected proposals). Such blocks hold no real token, so none is in the prefix cache."""
        blocks = self.req_to_blocks.get(request.request_id)
        keep = -(-num_tokens // self.block_size)
        if blocks is not None and len(blocks) > keep:
            extra = blocks[keep:]
            del blocks[keep:]
            self.pool.free(reversed(extra))

    def free(self, request: Request) -> None:
        """Release every block of the request, tail first (so its tail is evicted first)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        counts: dict[int, int] = {}
        for blocks in self.req_to_blocks.values():
            for b in blocks:
                counts[b.block_id] = counts.get(b.block_id, 0) + 1
        for block in self.pool.blocks:
            if block.ref_cnt != counts.get(block.block_id, 0):
                raise RuntimeError(f"ref count {block.ref_cnt} != table references: {block}")
