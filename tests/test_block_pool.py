"""Block pool (free list, prefix-cache map) and block manager (tables, prefix hits, fork, CoW, swap)."""
import pytest

from services.scheduler.block_manager import BlockManager
from services.scheduler.block_pool import BlockPool, HostPool


# ---------------------------------------------------------------------------------------- pool

def test_allocate_pops_least_recently_freed():
    pool = BlockPool(4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert (a, b, c) == (0, 1, 2)
    pool.free(c)
    pool.free(a)
    assert pool.free_block_ids() == [3, 2, 0]
    assert [pool.allocate() for _ in range(3)] == [3, 2, 0]
    assert pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate()
    pool.check_invariants()


def test_double_free_is_an_error():
    pool = BlockPool(2)
    b = pool.allocate()
    pool.free(b)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(b)


def test_freed_cached_block_is_a_hit_until_popped_for_new_data():
    pool = BlockPool(3)
    b = pool.allocate()
    pool.cache(pool.blocks[b], 1234)
    pool.free(b)
    assert pool.num_free == 3 and pool.lookup(1234) is pool.blocks[b]      # free, still cached
    pool.touch(pool.lookup(1234))                                           # hit: taken from the middle
    assert pool.ref_count(b) == 1 and b not in pool.free_block_ids()
    pool.check_invariants()
    pool.free(b)
    for _ in range(3):                                                      # popped for new data
        pool.allocate()
    assert pool.lookup(1234) is None and pool.blocks[b].hash is None
    pool.check_invariants()


def test_touch_raises_ref_of_block_in_use():
    pool = BlockPool(2)
    b = pool.allocate()
    pool.cache(pool.blocks[b], 7)
    pool.touch(pool.blocks[b])
    assert pool.ref_count(b) == 2 and pool.num_free == 1
    pool.free(b)
    assert pool.num_free == 1
    pool.free(b)
    assert pool.num_free == 2
    pool.check_invariants()


def test_duplicate_content_keeps_first_block_cached():
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.cache(pool.blocks[a], 99)
    pool.cache(pool.blocks[b], 99)
    assert pool.lookup(99).block_id == a and pool.blocks[b].hash is None


def test_caching_disabled_publishes_nothing():
    pool = BlockPool(2, enable_caching=False)
    a = pool.allocate()
    pool.cache(pool.blocks[a], 5)
    assert pool.lookup(5) is None


def test_host_pool():
    host = HostPool(3)
    ids = host.allocate(2)
    assert sorted(ids) == [0, 1] and host.num_free == 1
    with pytest.raises(RuntimeError):
        host.allocate(2)
    host.free(ids)
    assert host.num_free == 3


# ---------------------------------------------------------------------------------------- manager

def test_prefix_hit_whole_blocks_capped_below_prompt_length():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 13))                       # exactly 3 full blocks
    bm.allocate(0, len(prompt), bm.match_prefix(prompt))
    assert bm.append_slots(0, 0, 12, []) == 0
    bm.cache_full_blocks(0, prompt, 12)
    assert len(bm.cached_block_ids()) == 3
    # Same 12-token prompt: the hit stops at 8 tokens so at least one token is computed.
    hits = bm.match_prefix(prompt)
    assert [b.block_id for b in hits.blocks] == bm.block_ids(0)[:2]
    assert (hits.num_tokens, hits.num_free) == (8, 0)               # both blocks are in use
    # A longer prompt sharing the first 10 tokens hits the first 2 blocks.
    assert len(bm.match_prefix(prompt[:10] + [50, 51, 52]).blocks) == 2
    # A 13-token prompt extending it hits all 3.
    assert len(bm.match_prefix(prompt + [77]).blocks) == 3
    # Different first block: nothing (hashes are chained).
    assert bm.match_prefix([0] + prompt[1:] + [77]).blocks == []


def test_allocate_with_hits_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 10))
    bm.allocate(0, 9)
    bm.append_slots(0, 0, 9, [])
    bm.cache_full_blocks(0, prompt, 9)
    hits = bm.match_prefix(prompt)
    assert bm.blocks_to_admit(hits, 9) == 1                       # 3 blocks, 2 of them hits in use
    assert bm.allocate(1, 9, hits) == 8
    assert bm.block_ids(1) == bm.block_ids(0)[:2]
    assert [bm.ref_count(b) for b in bm.block_ids(0)] == [2, 2, 1]
    assert (bm.prefix_queries, bm.prefix_hits) == (18, 8)


def test_free_returns_tail_blocks_first_and_keeps_them_cached():
    bm = BlockManager(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5, 6]
    bm.allocate(0, 6)
    bm.append_slots(0, 0, 6, [])
    bm.cache_full_blocks(0, prompt, 6)
    table = bm.block_ids(0)
    bm.free(0)
    assert bm.pool.free_block_ids() == [3] + table[::-1]
    hits = bm.match_prefix(prompt + [7])
    assert len(hits.blocks) == hits.num_free == 3                  # all three still hit, all free
    assert bm.blocks_to_admit(hits, 7) == 4
    bm.check_invariants()


def test_fork_shares_and_copy_on_write_before_writing_shared_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 6)
    bm.append_slots(0, 0, 6, [])                                  # 2 blocks, the second half full
    bm.fork(0, 1)
    assert bm.block_ids(1) == bm.block_ids(0)
    assert all(bm.ref_count(b) == 2 for b in bm.block_ids(0))
    bm.check_invariants()
    copies, free = [], bm.num_free_blocks
    shared_last = bm.block_ids(0)[1]
    assert bm.append_slots(0, 6, 1, copies) == 1                  # parent copies first
    assert bm.num_free_blocks == free - 1                         # one block: the copy
    assert copies == [(shared_last, bm.block_ids(0)[1])] and bm.block_ids(0)[1] != shared_last
    assert bm.ref_count(shared_last) == 1
    assert bm.append_slots(1, 6, 1, copies) == -1                 # the last holder writes in place
    assert bm.block_ids(1)[1] == shared_last and len(copies) == 1
    assert bm.ref_count(bm.block_ids(0)[0]) == 2                  # full prefix block stays shared
    bm.end_step()                                                 # the copy source may go back now
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 8 and bm.num_seqs == 0
    bm.check_invariants()


def test_a_copy_source_freed_in_its_step_is_not_reallocated_before_the_step_ends():
    """The step's copies run as one launch: a block one copy reads must not be another's
    destination (a beam dropped after its sibling copied its partial block, in step 4 of a
    small-pool beam search)."""
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(0, 2)
    bm.append_slots(0, 0, 2, [])
    bm.fork(0, 1)
    bm.begin_step()
    copies = []
    src = bm.block_ids(0)[0]
    bm.append_slots(0, 2, 1, copies)                              # 0 copies the shared block away
    bm.free(1)                                                    # its last holder goes
    assert bm.ref_count(src) == 0 and bm.num_free_blocks == 2     # parked, not free
    bm.check_invariants()
    dsts = [bm.pool.allocate(), bm.pool.allocate()]
    assert src not in dsts and bm.num_free_blocks == 0
    bm.end_step()
    assert bm.pool.free_block_ids() == [src]
    for b in dsts:
        bm.pool.free(b)
    bm.free(0)
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_a_parked_copy_source_can_still_be_a_prefix_hit():
    pool = BlockPool(2)
    b = pool.allocate()
    pool.cache(pool.blocks[b], b"k")
    pool.hold_for_step(b)
    pool.free(b)
    assert pool.num_free == 1
    pool.touch(pool.lookup(b"k"))                                  # taken back from the parked ones
    assert pool.ref_count(b) == 1
    pool.end_step()
    assert pool.free_block_ids() == [1 - b]
    pool.check_invariants()


def test_append_slots_fails_without_change_when_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate(0, 8)
    assert bm.append_slots(0, 0, 8, []) == 0
    assert bm.append_slots(0, 8, 1, []) is None
    assert len(bm.block_ids(0)) == 2
    assert bm.free_slots(0, 8) == 0


def test_free_slots_counts_the_tail_of_its_blocks_and_every_free_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 6)
    bm.append_slots(0, 0, 6, [])                       # 2 blocks, 2 slots left in the second
    assert bm.free_slots(0, 6) == 2 + 6 * 4
    bm.allocate(1, 4)
    bm.append_slots(1, 0, 4, [])                       # another sequence takes one more block
    assert bm.free_slots(0, 6) == 2 + 5 * 4


def test_swap_out_and_in_round_trip():
    bm = BlockManager(num_blocks=4, block_size=2, num_host_blocks=3)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate(0, 5)
    bm.append_slots(0, 0, 5, [])
    bm.cache_full_blocks(0, prompt, 4)
    table = bm.block_ids(0)
    assert bm.can_swap_out(0)
    out = bm.swap_out(0)
    assert [d for d, _ in out] == table and bm.num_free_blocks == 4 and bm.host.num_free == 0
    assert bm.host_block_ids(0) == [h for _, h in out] and bm.blocks_to_swap_in(0) == 3
    bm.check_invariants()
    bm.allocate(1, 8)                                             # device blocks get reused
    assert bm.append_slots(1, 0, 8, []) == 0
    assert not bm.cached_block_ids()                              # which drops their content
    bm.free(1)
    back = bm.swap_in(0)
    assert [h for h, _ in back] == [h for _, h in out]
    assert [d for _, d in back] == bm.block_ids(0) and bm.host.num_free == 3
    assert len(bm.match_prefix(prompt).blocks) == 2                # full blocks published again
    bm.free(0)
    bm.check_invariants()


def test_check_invariants_catches_a_reference_no_table_holds():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(0, 3)
    bm.append_slots(0, 0, 3, [])
    bm.check_invariants()
    bm.pool.touch(bm.pool.blocks[bm.block_ids(0)[0]])             # a leaked reference
    with pytest.raises(AssertionError, match="ref count 2, 1 table entries"):
        bm.check_invariants()
