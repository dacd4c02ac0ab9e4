"""Block tables per sequence on top of the block pool: on-demand growth, prefix cache,
fork with shared blocks, copy-on-write, and swap to/from the host pool.

A sequence is known here only by its int id; the scheduler passes token lists in. Positions
``[0, num_computed)`` of a sequence are in the cache; the block holding position ``p`` is
``table[p // block_size]``.

Prefix cache: the key of full block ``i`` is a SHA-256 digest chaining its parent's,
``sha256(digest of block i-1 || its block_size token ids || extra_keys)`` over a canonical
encoding, block 0's parent being the request's salted (``cache_salt``) or unsalted root
(block_hash.py), so equal digests mean equal whole prefixes under equal salts. Each sequence's
``HashChain`` computes a block's digest once and keeps it. A block is published when the step that fills it is *scheduled* (prompt
or generated tokens), as vLLM does: a request admitted later in the same step can then share it,
because every backend writes a layer's K/V for all tokens of the step before any token attends.
``published`` lists the blocks the step being planned made visible; if that plan never runs,
``unpublish_step`` takes them back so no later prompt hits a block whose content never arrived.

Sliding window (``sliding_window`` W > 0: every layer attends only to keys ``p - W < k <= p``):
once a sequence's next query position is ``q``, blocks whose positions all lie at or before
``q - W`` are never read again. ``release_out_of_window`` frees them (a full hashed block whose
ref count drops to 0 stays cached, as when a sequence finishes) and puts ``NULL_BLOCK`` in their
table entries, so a table keeps its length and ``table[p // block_size]`` stays the block of
position ``p``. Released entries are always a table's leading ones; ``_released`` counts them,
which tells a placeholder from a real block 0. The executor is not told (no ``TableUpdate``): its
copy of those entries may name the freed blocks or ``NULL_BLOCK``, both readable ids whose keys
its window mask hides.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Optional

from services.scheduler.block_hash import ROOT, HashChain, chain_digest, encode_key
from services.scheduler.block_pool import Block, BlockPool, HostPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The table entry of a block that left the sliding window. A real block id (possibly held by
# another sequence) so the executor can index with it unchanged: block 0, which is also what the
# executor pads block tables with; its keys are masked, and the KV cache is zero-initialised, so
# a masked read never meets NaN.
NULL_BLOCK = 0


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The cached blocks a prompt's prefix hits (after vLLM's ``KVCacheBlocks``): what admitting
    it would reuse, and how many of those blocks admission would take off the free list."""

    blocks: list[Block]         # in prefix order
    num_tokens: int             # tokens they hold (whole blocks)
    num_free: int               # of the blocks admission holds (not out of the window), those free now


NO_PREFIX = PrefixMatch([], 0, 0)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0,
                 enable_prefix_caching: bool = True, sliding_window: int = 0):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window           # W, or 0: every block stays readable
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.host = HostPool(num_host_blocks)
        self.tables: dict[int, list[int]] = {}         # seq id -> device block ids
        self.host_tables: dict[int, list[int]] = {}    # seq id -> host block ids (swapped out)
        self._hashes: dict[int, list[bytes]] = {}      # seq id -> digests of its published blocks
        self._chains: dict[int, HashChain] = {}        # seq id -> its digests (salt, extra keys)
        self._released: dict[int, int] = {}            # seq id -> leading entries out of the window
        self.published: list[Block] = []               # blocks the step being planned publishes
        self.prefix_queries = 0                        # prefix-cache lookups, in prompt tokens
        self.prefix_hits = 0                           # of which served from the cache, in tokens

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_seqs(self) -> int:
        """Sequences holding device or host blocks."""
        return len(self.tables) + len(self.host_tables)

    def block_ids(self, seq_id: int, start: int = 0) -> list[int]:
        """A copy of the sequence's device block table from index ``start``."""
        return self.tables[seq_id][start:]

    def host_block_ids(self, seq_id: int) -> list[int]:
        return list(self.host_tables[seq_id])

    def is_swapped_out(self, seq_id: int) -> bool:
        return seq_id in self.host_tables

    def ref_count(self, block_id: int) -> int:
        return self.pool.ref_count(block_id)

    def num_released(self, seq_id: int) -> int:
        """Leading table entries that left the sliding window (``NULL_BLOCK``, no block held)."""
        return self._released.get(seq_id, 0)

    def num_held(self, seq_id: int) -> int:
        """Device blocks the sequence's table holds (a reference each)."""
        return len(self.tables[seq_id]) - self._released.get(seq_id, 0)

    def first_readable(self, num_computed: int) -> int:
        """The first table index a query at position ``num_computed`` (or later) may read."""
        w = self.sliding_window
        return max((num_computed - w + 1) // self.block_size, 0) if w else 0

    def cached_block_ids(self) -> dict[int, int]:
        return self.pool.cached_block_ids()

    def check_invariants(self) -> None:
        """AssertionError unless the pool is consistent, every device block's ref count is the
        number of (not released) table entries naming it, and host blocks are each held once."""
        self.pool.check_invariants()
        for sid, f in self._released.items():
            table = self.tables.get(sid)
            assert table is not None or sid in self.host_tables, f"seq {sid}: released entries, no table"
            if table is not None:
                assert 0 < f <= len(table) and all(b == NULL_BLOCK for b in table[:f]), \
                    f"seq {sid}: {f} released entries, table {table}"
            if self.enable_prefix_caching:       # released blocks were published before they left
                assert len(self._hashes[sid]) >= f, f"seq {sid}: released an unpublished block"
        refs = Counter(b for sid, table in self.tables.items() for b in table[self._released.get(sid, 0):])
        for block_id in range(self.num_blocks):
            assert self.ref_count(block_id) == refs[block_id], \
                f"block {block_id}: ref count {self.ref_count(block_id)}, {refs[block_id]} table entries"
        host = [h for table in self.host_tables.values() for h in table]
        assert len(host) == len(set(host)), "a host block is held twice"
        assert len(host) + self.host.num_free == self.host.num_blocks, "a host block is lost"
        assert set(self.tables).isdisjoint(self.host_tables), "a sequence is on device and host"

    def block_hash(self, parent: Optional[bytes], token_ids, extra_keys: Hashable = None) -> bytes:
        """The digest of a full block under ``parent`` (None: block 0, unsalted)."""
        return chain_digest(ROOT if parent is None else parent, token_ids, encode_key(extra_keys))

    def hash_chain(self, salt: Optional[str] = None, extra_keys: Hashable = None) -> HashChain:
        """A new sequence's (empty) digest chain; the scheduler keeps one per sequence."""
        return HashChain(self.block_size, salt, extra_keys)

    # ---------------------------------------------------------------------------- prefix cache

    def match_prefix(self, token_ids: list[int], chain: Optional[HashChain] = None) -> PrefixMatch:
        """Cached blocks covering the longest prefix of ``token_ids``; whole blocks only, at most
        ``len(token_ids) - 1`` tokens so at least one token is left to compute. No side effects
        on the cache; ``chain`` (default: unsalted) keeps the digests it computes."""
        if not self.enable_prefix_caching:
            return NO_PREFIX
        chain = chain or self.hash_chain()
        bs, hits, lookup = self.block_size, [], self.pool.lookup
        for i in range((len(token_ids) - 1) // bs):
            block = lookup(chain.digest(i, token_ids))
            if block is None:
                break
            hits.append(block)
        keep = self.first_readable(len(hits) * bs)     # hits before it are left out of the table
        return PrefixMatch(hits, len(hits) * bs, sum(b.ref_cnt == 0 for b in hits[keep:]))

    def blocks_to_admit(self, prefix: PrefixMatch, num_tokens: int) -> int:
        """Free blocks that admitting a sequence with this prefix hit, holding ``num_tokens``
        tokens, would take off the free list (new blocks plus hit blocks that are free now)."""
        return max(cdiv(num_tokens, self.block_size) - len(prefix.blocks), 0) + prefix.num_free

    def allocate(self, seq_id: int, num_prompt_tokens: int, prefix: PrefixMatch = NO_PREFIX,
                 chain: Optional[HashChain] = None) -> int:
        """Register a sequence whose table starts with the prefix-hit blocks (those already out of
        the window as ``NULL_BLOCK``, not held); returns the number of cached tokens. Growth for
        the tokens to compute comes from ``append_slots``. ``chain``: the one ``match_prefix``
        was given (default: unsalted)."""
        if seq_id in self.tables:
            raise RuntimeError(f"seq {seq_id} already has a block table")
        keep = self.first_readable(prefix.num_tokens)
        for block in prefix.blocks[keep:]:
            self.pool.touch(block)
        self.tables[seq_id] = [NULL_BLOCK] * keep + [b.block_id for b in prefix.blocks[keep:]]
        if keep:
            self._released[seq_id] = keep
        self._hashes[seq_id] = [b.hash for b in prefix.blocks]
        self._chains[seq_id] = chain or self.hash_chain()
        if self.enable_prefix_caching:
            self.prefix_queries += num_prompt_tokens
            self.prefix_hits += prefix.num_tokens
        return prefix.num_tokens

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Publish every block of the sequence that ``num_computed`` tokens fill (once the step
        scheduling them runs)."""
        hashes = self._hashes[seq_id]
        bs = self.block_size
        if not self.enable_prefix_caching or len(hashes) >= num_computed // bs:
            return
        table, blocks, chain = self.tables[seq_id], self.pool.blocks, self._chains[seq_id]
        for i in range(len(hashes), num_computed // bs):
            block = blocks[table[i]]
            h = block.hash      # shared blocks (fork, prefix hit) are already published
            if h is None:
                h = chain.digest(i, token_ids)
                self._publish(block, h)
            hashes.append(h)

    def _publish(self, block: Block, block_hash: bytes) -> None:
        if self.pool.cache(block, block_hash):
            self.published.append(block)

    def begin_step(self) -> None:
        self.published.clear()
        self.pool.end_step()

    def end_step(self) -> None:
        """The plan is built: this step's copy sources may be reallocated from the next step on."""
        self.pool.end_step()

    def unpublish_step(self) -> None:
        """The planned step did not run: the blocks it published hold no valid K/V."""
        for block in self.published:
            self.pool.uncache(block)
        self.published.clear()

    # ---------------------------------------------------------------------------- growth, CoW

    def free_slots(self, seq_id: int, num_computed: int) -> int:
        """Token slots from position ``num_computed`` on that the sequence's blocks and the free
        blocks can hold (copy-on-write not counted)."""
        return (len(self.tables[seq_id]) + self.pool.num_free) * self.block_size - num_computed

    def append_slots(self, seq_id: int, num_computed: int, num_new: int,
                     copies: list[tuple[int, int]]) -> Optional[int]:
        """Make room for tokens ``[num_computed, num_computed + num_new)``.

        The block the first new token lands in is copied first if it is shared (copy-on-write:
        ``(src, dst)`` goes to ``copies``, the table points at the copy); missing blocks are
        appended. Returns the first table index that changed (``-1``: none), or ``None`` without
        changing anything when the free blocks do not suffice.
        """
        table = self.tables[seq_id]
        bs, pool = self.block_size, self.pool
        first = num_computed // bs
        end = (num_computed + num_new + bs - 1) // bs
        shared = first < len(table) and pool.blocks[table[first]].ref_cnt > 1
        if end <= len(table) and not shared:
            return -1                                           # the common decode step
        if max(end - len(table), 0) + shared > pool.num_free:
            return None
        changed = len(table)
        if shared:
            src = table[first]
            dst = pool.allocate()
            copies.append((src, dst))
            pool.hold_for_step(src)
            pool.free(src)
            table[first] = dst
            changed = first
        while len(table) < end:
            table.append(pool.allocate())
        return changed

    def release_out_of_window(self, seq_id: int, num_computed: int) -> int:
        """Free the leading blocks no query from position ``num_computed`` on reads (those whose
        positions are all ``<= num_computed - W``), O(1) per block. Returns the ``num_computed``
        at which the next block leaves the window: until then a call would free nothing."""
        end = self.first_readable(num_computed)
        start = self._released.get(seq_id, 0)
        if end > start:
            table, free = self.tables[seq_id], self.pool.free
            for i in range(start, end):
                free(table[i])
                table[i] = NULL_BLOCK
            self._released[seq_id] = end
        return (max(end, start) + 1) * self.block_size + self.sliding_window - 1

    def fork(self, parent_id: int, child_id: int, chain: Optional[HashChain] = None) -> None:
        """The child's table shares every block the parent's holds (ref counts raised); its
        digest chain is ``chain`` (default: a copy of the parent's)."""
        table = self.tables[parent_id]
        released = self._released.get(parent_id, 0)
        for block_id in table[released:]:
            self.pool.blocks[block_id].ref_cnt += 1
        if released:
            self._released[child_id] = released
        self.tables[child_id] = list(table)
        self._hashes[child_id] = list(self._hashes[parent_id])
        self._chains[child_id] = chain or self._chains[parent_id].copy()

    def free(self, seq_id: int) -> None:
        """Release a sequence's device and host blocks; tail blocks first, so the free list
        evicts a prefix's tail before its head."""
        table = self.tables.pop(seq_id, None)
        released = self._released.pop(seq_id, 0)
        if table is not None:
            for block_id in reversed(table[released:]):
                self.pool.free(block_id)
        host_table = self.host_tables.pop(seq_id, None)
        if host_table is not None:
            self.host.free(host_table)
        self._hashes.pop(seq_id, None)
        self._chains.pop(seq_id, None)

    # ---------------------------------------------------------------------------- swap

    def can_swap_out(self, seq_id: int) -> bool:
        return self.num_held(seq_id) <= self.host.num_free

    def swap_out(self, seq_id: int) -> list[tuple[int, int]]:
        """Move the blocks a sequence holds to the host pool (released entries stay released);
        returns ``(device, host)`` copy pairs."""
        table = self.tables.pop(seq_id)[self._released.get(seq_id, 0):]
        host_table = self.host.allocate(len(table))
        for block_id in reversed(table):
            self.pool.free(block_id)
        self.host_tables[seq_id] = host_table
        return list(zip(table, host_table))

    def blocks_to_swap_in(self, seq_id: int, num_tokens: int = 0) -> int:
        """Free blocks that swapping the sequence in and growing it to ``num_tokens`` take."""
        held = len(self.host_tables[seq_id])
        return held + max(cdiv(num_tokens, self.block_size) - self._released.get(seq_id, 0) - held, 0)

    def swap_in(self, seq_id: int) -> list[tuple[int, int]]:
        """Bring a swapped sequence back into fresh device blocks; returns ``(host, device)``."""
        host_table = self.host_tables.pop(seq_id)
        released = self._released.get(seq_id, 0)
        held = [self.pool.allocate() for _ in host_table]
        self.tables[seq_id] = [NULL_BLOCK] * released + held
        self.host.free(host_table)
        for block_id, h in zip(held, self._hashes[seq_id][released:]):   # full blocks: cacheable again
            self._publish(self.pool.blocks[block_id], h)
        return list(zip(host_table, held))
