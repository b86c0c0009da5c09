"""The paged KV cache's bookkeeping: a block pool with prefix caching (pure Python).

Each request owns a list of blocks of `block_size` token slots. With prefix caching, every *full*
block is named by a hash chain over the tokens up to its end, so two requests with a common prefix
share those blocks (reference counts). Freed blocks keep their contents and hash in an LRU free
queue until a new allocation evicts them, so a repeated prompt finds them again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from twinfer.engine.request import Request

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of a full block, chained to its parent's (128-bit BLAKE2b).

    NOTE: a cryptographic hash, not Python's `hash`: with a weak hash one user could craft a prompt
    that collides with another user's prefix and read their cache.
    """
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt})"


class KVCacheManager:
    """Hands out KV blocks to requests; shares full blocks through the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, least recently freed first: allocation evicts from the front.
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[BlockHash, KVCacheBlock] = {}
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        # Statistics for logs and metrics.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queries ----
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----
    def update_block_hashes(self, req: Request) -> None:
        """Extend `req.block_hashes` to every full block of its known tokens."""
        bs = self.block_size
        tokens = req.all_token_ids
        for i in range(len(req.block_hashes), len(tokens) // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs]))

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request that has nothing computed: (blocks, their tokens).

        At least the last token is always left to compute, because its logits are needed.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self.update_block_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in req.block_hashes[:max_blocks]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ---- allocation ----
    def allocate_slots(
        self,
        req: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> bool:
        """Make room for `num_new_tokens` more tokens (after any cache hits); False if full."""
        owned = self.req_blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = total - len(owned) - len(new_computed_blocks)
        # Cache hits that sit in the free queue stop being free once this request holds them.
        reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + reclaimed > self.num_free_blocks:
            if not owned:
                del self.req_blocks[req.request_id]
            return False
        for block in new_computed_blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1
        owned.extend(new_computed_blocks)
        for _ in range(max(num_new_blocks, 0)):
            owned.append(self._pop_free_block())
        if self.enable_prefix_caching:
            self._cache_full_blocks(req, owned, num_computed + num_new_tokens)
        return True

    def _pop_free_block(self) -> KVCacheBlock:
        _, block = self.free_queue.popitem(last=False)
        if block.block_hash is not None:
            # Evict: the block is about to hold other tokens.
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def _cache_full_blocks(self, req: Request, owned: list[KVCacheBlock], num_tokens: int) -> None:
        """Name every block that is full once `num_tokens` tokens are computed."""
        self.update_block_hashes(req)
        num_full = min(num_tokens // self.block_size, len(req.block_hashes))
        for i in range(num_full):
            block = owned[i]
            if block.block_hash is not None:
                continue
            block_hash = req.block_hashes[i]
            block.block_hash = block_hash
            # NOTE: a second copy of the same content (two requests computed it at once) stays
            # private; the first one remains the shared entry.
            self.cached.setdefault(block_hash, block)

    def free(self, req: Request) -> None:
        """Release a request's blocks; full, computed blocks stay cached until evicted."""
        blocks = self.req_blocks.pop(req.request_id, [])
        # Blocks are named when scheduled; if the step that was to fill them never finished
        # (an exception, an abort), their contents are not what the name says: forget them.
        first_unwritten = req.num_computed_tokens // self.block_size
        # Tail blocks first, so eviction takes the end of a prefix before its start.
        for i in reversed(range(len(blocks))):
            block = blocks[i]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if i >= first_unwritten and block.block_hash is not None:
                    if self.cached.get(block.block_hash) is block:
                        del self.cached[block.block_hash]
                    block.block_hash = None
                if block.block_hash is None or self.cached.get(block.block_hash) is not block:
                    block.block_hash = None
                    # Uncached blocks are worthless: reuse them before any cached one.
                    self.free_queue[block.block_id] = block
                    self.free_queue.move_to_end(block.block_id, last=False)
                else:
                    self.free_queue[block.block_id] = block

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks; only possible when no request holds a block."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True
