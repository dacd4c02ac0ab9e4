"""The block pool: which physical KV blocks are free, who holds them, which hold a cached prefix.

Mechanism only (no policy). Every block is either on the free list (``ref_cnt == 0``) or in use
(``ref_cnt >= 1``). The free list is a doubly linked list in LRU order: ``allocate`` takes the
least recently freed block from the front, ``free`` appends at the back, and a prefix-cache hit
on a free block unlinks it from the middle, all in O(1).

A freed block whose content is a full, hashed block stays on the free list *and* in the
hash -> block map, so a later prompt with the same prefix can take it back (a cache hit). Its hash
is dropped only when ``allocate`` pops it for new data.

A step's copies run as one parallel launch before its forward pass, so a block a copy reads must
not be handed out again in that step (a later copy into it would race with the read).
``hold_for_step`` marks a copy source; if its last reference goes during the step, it is parked
instead of freed, and ``end_step`` puts the parked blocks on the free list.
"""
from __future__ import annotations

from typing import Optional


class Block:
    """One physical KV block. ``prev``/``next`` link it into the free list while it is free."""

    __slots__ = ("block_id", "ref_cnt", "hash", "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.hash: Optional[bytes] = None       # its prefix-cache key (block_hash.py), if published
        self.prev: Optional[Block] = None
        self.next: Optional[Block] = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={self.hash})"


class FreeBlockList:
    """Doubly linked list with two sentinels: O(1) ``popleft``, ``append`` and ``remove``."""

    def __init__(self, blocks: list[Block]):
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self._size = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._size

    def append(self, block: Block) -> None:
        last = self._tail.prev
        last.next = block
        block.prev, block.next = last, self._tail
        self._tail.prev = block
        self._size += 1

    def remove(self, block: Block) -> None:
        block.prev.next = block.next
        block.next.prev = block.prev
        block.prev = block.next = None
        self._size -= 1

    def popleft(self) -> Block:
        if self._size == 0:
            raise RuntimeError("no free KV blocks")
        block = self._head.next
        self.remove(block)
        return block

    def __iter__(self):
        block = self._head.next
        while block is not self._tail:
            yield block
            block = block.next


class BlockPool:
    """``num_blocks`` device blocks, their ref counts, the LRU free list and the prefix-cache map."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_list = FreeBlockList(self.blocks)
        self.cached: dict[bytes, Block] = {}    # block digest -> block holding that full block
        self.num_evictions = 0                  # cached free blocks taken back for new data
        self._step_sources: set[int] = set()    # blocks this step's copies read
        self._parked: list[Block] = []          # of those, freed during the step

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_cnt

    def free_block_ids(self) -> list[int]:
        """The free list, front (next to be allocated) first."""
        return [b.block_id for b in self.free_list]

    def cached_block_ids(self) -> dict[bytes, int]:
        """Block hash -> id of the block holding that content."""
        return {h: b.block_id for h, b in self.cached.items()}

    def check_invariants(self) -> None:
        """AssertionError unless every block is either free (ref 0, on the free list once) or in
        use, and the hash map names each cached block by its own hash."""
        free = self.free_block_ids()
        assert len(free) == len(set(free)) == self.num_free, "free list and its count disagree"
        assert all(self.blocks[i].ref_cnt == 0 for i in free), "a block on the free list is in use"
        in_use = sum(b.ref_cnt > 0 for b in self.blocks)
        assert all(b.ref_cnt == 0 for b in self._parked), "a parked block is in use"
        assert self.num_free + in_use + len(self._parked) == self.num_blocks, "a block is neither free nor in use"
        assert all(b.hash == h for h, b in self.cached.items()), "a cached block lost its hash"

    def allocate(self) -> int:
        """Take the least recently freed block for new data (its cached content is forgotten)."""
        block = self.free_list.popleft()
        if block.hash is not None:
            del self.cached[block.hash]
            block.hash = None
            self.num_evictions += 1
        block.ref_cnt = 1
        return block.block_id

    def free(self, block_id: int) -> None:
        """Drop one reference; at zero the block goes to the back of the free list (still cached)."""
        block = self.blocks[block_id]
        if block.ref_cnt <= 0:
            raise RuntimeError(f"double free of block {block_id}")
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            if self._step_sources and block_id in self._step_sources:
                self._parked.append(block)
            else:
                self.free_list.append(block)

    def hold_for_step(self, block_id: int) -> None:
        """A copy of this step reads the block: it is not reallocated before ``end_step``."""
        self._step_sources.add(block_id)

    def end_step(self) -> None:
        """The step's plan is built: copy sources freed meanwhile go to the free list."""
        for block in self._parked:
            self.free_list.append(block)
        self._parked.clear()
        self._step_sources.clear()

    def lookup(self, block_hash: bytes) -> Optional[Block]:
        return self.cached.get(block_hash)

    def touch(self, block: Block) -> None:
        """Take one more reference to a cached block (a prefix hit), reviving it if it was free."""
        if block.ref_cnt == 0:
            if block in self._parked:       # a copy source of this step, freed meanwhile
                self._parked.remove(block)
            else:
                self.free_list.remove(block)
        block.ref_cnt += 1

    def cache(self, block: Block, block_hash: bytes) -> bool:
        """Publish a full block under its chained hash; True if it was published. If another
        block already holds the same content (two sequences computed it at once), this one
        simply stays uncached."""
        if self.enable_caching and block.hash is None and block_hash not in self.cached:
            block.hash = block_hash
            self.cached[block_hash] = block
            return True
        return False

    def uncache(self, block: Block) -> None:
        """Forget a published block's content (it stays where it is: free or in use)."""
        if block.hash is not None and self.cached.get(block.hash) is block:
            del self.cached[block.hash]
        block.hash = None


class HostPool:
    """The CPU swap pool: ``num_host_blocks`` ids on a plain free list (no sharing, no caching)."""

    def __init__(self, num_host_blocks: int):
        self.num_blocks = num_host_blocks
        self._free = list(range(num_host_blocks - 1, -1, -1))   # pop() hands out 0, 1, 2, ...

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"host pool has {len(self._free)} free blocks, {n} requested")
        return [self._free.pop() for _ in range(n)]

    def free(self, host_block_ids: list[int]) -> None:
        self._free.extend(reversed(host_block_ids))
