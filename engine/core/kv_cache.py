"""KV memory on the scheduler's side: the physical blocks and each request's view of them.

:class:`BlockPool` holds the blocks: reference counts, an LRU queue of free blocks and the
prefix-cache hash map. Invariants:
- a block is in the free queue iff its ``ref_cnt`` is 0;
- a block is in ``by_hash`` iff it has a ``block_hash``; such a block is full and immutable;
- the free queue is ordered by eviction priority: blocks that cache nothing come first,
  then cached blocks from least to most recently freed.

:class:`KVCacheManager` is the per-request view: which blocks a request holds, prefix-cache
lookups. The scheduler's whole contract with KV memory is
:meth:`KVCacheManager.get_computed_blocks`, :meth:`KVCacheManager.allocate_slots` (blocks,
or ``None`` when the pool cannot serve) and :meth:`KVCacheManager.free`.

A full block's key is ``sha256(parent_key || token_ids)``, the chain rooted in a hash of the
request's cache salt. A cache hit is taken only when the stored tokens equal the request's,
so even a hash collision cannot serve wrong KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from .request import Request


class KVBlock:
    __slots__ = ("block_hash", "block_id", "ref_cnt", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        cached = "cached" if self.block_hash is not None else "plain"
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, {cached})"


class BlockPool:
    """All KV blocks of the engine; hands them out, takes them back, remembers cached ones."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block; got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.by_hash: dict[bytes, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[KVBlock]:
        """Take ``count`` blocks off the front of the free queue, evicting their cache entry."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks with {len(self._free)} free")
        taken = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self.by_hash[block.block_hash]
                block.block_hash = None
                block.token_ids = None
                self.num_evictions += 1
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def lookup(self, block_hash: bytes, token_ids: tuple[int, ...]) -> KVBlock | None:
        """The cached block for this hash, if its tokens match too (a hash is not trusted alone)."""
        block = self.by_hash.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the free queue.

        Give blocks in the order they should be evicted (first = evicted first). Blocks that
        cache nothing go to the front, since nobody can ever reuse them.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache(self, block: KVBlock, block_hash: bytes, token_ids: tuple[int, ...]) -> None:
        """Register a full block under its hash (first writer wins on duplicates)."""
        if block.block_hash is not None or block_hash in self.by_hash:
            return
        block.block_hash = block_hash
        block.token_ids = token_ids
        self.by_hash[block_hash] = block

    def uncache(self, block: KVBlock) -> None:
        """Forget what a held block caches (its KV was never written): nobody may hit it."""
        if block.block_hash is not None and self.by_hash.get(block.block_hash) is block:
            del self.by_hash[block.block_hash]
        block.block_hash = None
        block.token_ids = None


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of a full block: chained from its parent's key and its own token ids."""
    digest = hashlib.sha256(parent)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def root_hash(cache_salt: str | None) -> bytes:
    return hashlib.sha256(b"metroline-kv-root:" + (cache_salt or "").encode()).digest()


class KVCacheManager:
    """Allocates KV blocks to requests and shares full blocks through prefix caching.

    Invariants: ``req_blocks[r]`` covers at least the first ``r.num_computed_tokens`` tokens
    of ``r``; its first ``num_cached_blocks[r]`` blocks are registered in the pool's cache.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def hashes_blocks(self, request: Request) -> bool:
        """With prefix caching off, only salted requests (siblings of ``n > 1``) share blocks."""
        return self.enable_prefix_caching or request.cache_salt is not None

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Cached blocks matching the request's leading tokens, and the tokens they cover.

        At least the last token is always left to compute, since its logits are needed.
        """
        if not self.hashes_blocks(request):
            return [], 0
        size = self.block_size
        max_blocks = (request.num_tokens - 1) // size
        self._update_hashes(request, max_blocks)
        hits: list[KVBlock] = []
        for i in range(max_blocks):
            tokens = tuple(request.all_token_ids[i * size : (i + 1) * size])
            block = self.pool.lookup(request.block_hashes[i], tokens)
            if block is None:
                break
            hits.append(block)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(hits) * size
        return hits, len(hits) * size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
    ) -> list[KVBlock] | None:
        """Make room for ``num_new_tokens`` more tokens after the computed ones.

        ``new_computed_blocks`` are prefix-cache hits (from :meth:`get_computed_blocks`) that
        the request takes now. Returns the newly allocated blocks, or ``None`` (and changes
        nothing) when the pool has too few free blocks.
        """
        held = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total_tokens = num_computed + num_new_tokens
        needed = -(-total_tokens // self.block_size)
        num_new_blocks = max(0, needed - len(held) - len(new_computed_blocks))
        # Hits that sit in the free queue stop being free once taken.
        reclaimed = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - reclaimed:
            if not held:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(new_computed_blocks)
        held.extend(new_computed_blocks)
        if new_computed_blocks:
            self.num_cached_blocks[request.request_id] = len(held)
        new_blocks = self.pool.allocate(num_new_blocks)
        held.extend(new_blocks)
        if self.hashes_blocks(request):
            self._cache_full_blocks(request, held, total_tokens)
        return new_blocks

    def free(self, request: Request) -> None:
        """Return all of the request's blocks; tail blocks are evicted before the prefix."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.release(reversed(blocks))

    def trim(self, request: Request, num_tokens: int) -> int | None:
        """Keep only the blocks that the request's first ``num_tokens`` tokens need; the rest
        (slots of rejected speculative tokens) return to the pool. Returns how many blocks
        the request keeps, or None when nothing was dropped. Blocks registered in the
        prefix cache hold only real tokens, which ``num_tokens`` must cover."""
        held = self.req_blocks.get(request.request_id)
        keep = -(-num_tokens // self.block_size)
        if not held or keep >= len(held):
            return None
        if keep < self.num_cached_blocks.get(request.request_id, 0):
            raise ValueError(f"trim to {num_tokens} tokens would drop prefix-cached blocks")
        extra = held[keep:]
        del held[keep:]
        self.pool.release(reversed(extra))
        return keep

    def forget_unwritten(self, request: Request, from_token: int) -> list[KVBlock]:
        """The request's KV from token ``from_token`` on was never written (its step ran
        without it): take those blocks out of the prefix cache so that no later request hits
        them. Returns them, for the caller to find other requests already holding them."""
        blocks = self.req_blocks.get(request.request_id, [])[from_token // self.block_size :]
        for block in blocks:
            self.pool.uncache(block)
        return blocks

    def holders(self, blocks: Sequence[KVBlock]) -> list[str]:
        """Requests that hold any of ``blocks`` (a scan of every request: a rare path)."""
        wanted = {id(block) for block in blocks}
        return [r for r, held in self.req_blocks.items() if any(id(b) in wanted for b in held)]

    def block_ids(self, request: Request) -> list[int]:
        return [block.block_id for block in self.req_blocks.get(request.request_id, ())]

    def _cache_full_blocks(self, request: Request, held: list[KVBlock], num_tokens: int) -> None:
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(request, num_full)
        size = self.block_size
        for i in range(start, num_full):
            tokens = tuple(request.all_token_ids[i * size : (i + 1) * size])
            self.pool.cache(held[i], request.block_hashes[i], tokens)
        self.num_cached_blocks[request.request_id] = num_full

    def _update_hashes(self, request: Request, num_blocks: int) -> None:
        hashes = request.block_hashes
        size = self.block_size
        parent = hashes[-1] if hashes else root_hash(request.cache_salt)
        for i in range(len(hashes), num_blocks):
            parent = block_hash(parent, request.all_token_ids[i * size : (i + 1) * size])
            hashes.append(parent)
