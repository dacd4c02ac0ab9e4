"""The contiguous baseline: first fit, coalescing, fragmentation accounting, FCFS batching."""
import pytest
from hypothesis import given, settings, strategies as st

from services.scheduler.sim.contiguous import ContiguousAllocator, ContiguousSeq, ContiguousSimulator


def test_first_fit_takes_the_lowest_run_and_free_coalesces():
    a = ContiguousAllocator(10)
    assert [a.allocate(3), a.allocate(3), a.allocate(3)] == [0, 3, 6]
    a.free(3)
    assert a.allocate(2) == 3                     # the hole, not the tail
    a.free(0), a.free(3), a.free(6)
    a.check()
    assert (a.starts, a.lengths, a.num_free) == ([0], [10], 10)


def test_failures_with_enough_free_memory_are_external_fragmentation():
    a = ContiguousAllocator(10)
    first, _, third = a.allocate(3), a.allocate(3), a.allocate(3)
    a.free(first), a.free(third)                  # free: [0,3) and [6,10): 7 slots, largest run 4
    assert a.num_free == 7 and a.largest_free_run == 4
    assert a.allocate(5) is None                  # 7 free >= 5, but not in one piece
    assert a.allocate(8) is None                  # genuinely out of memory
    assert (a.failures, a.failures_with_free_memory) == (2, 1)


def test_bad_sizes_and_double_free_are_errors():
    a = ContiguousAllocator(4)
    with pytest.raises(ValueError):
        a.allocate(0)
    start = a.allocate(2)
    a.free(start)
    with pytest.raises(KeyError):
        a.free(start)
    with pytest.raises(ValueError):
        ContiguousAllocator(0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=80))
def test_runs_always_tile_the_address_range(ops):
    a = ContiguousAllocator(100)
    live = []
    for alloc, size in ops:
        if alloc or not live:
            start = a.allocate(size)
            if start is not None:
                live.append(start)
        else:
            a.free(live.pop(size % len(live)))
        a.check()
    assert a.num_free + sum(a.used.values()) == 100


def test_simulator_reserves_per_sample_admits_fcfs_and_frees_on_finish():
    sim = ContiguousSimulator(capacity=100, max_num_seqs=8, max_num_batched_tokens=64)
    sim.add([ContiguousSeq("a", 10, 3, 40)])
    sim.add([ContiguousSeq("b", 10, 2, 40), ContiguousSeq("b", 10, 2, 40)])   # n = 2: two reservations
    sim.add([ContiguousSeq("c", 10, 1, 40)])
    assert sim.step() == 10                       # a prefills; b does not fit (needs 80 of 60 free)
    assert (len(sim.running), sim.slots_reserved, sim.alloc.failures_with_free_memory) == (1, 40, 0)
    assert sim.tokens_stored() == 10              # prompt cached, the sampled token not yet
    sim.reap()
    sim.step(), sim.reap()
    assert sim.step() == 1 and sim.reap() == 1               # a's third token: it finishes, frees 40
    assert sim.step() == 10                                   # b: one prefill, two reservations
    assert sim.slots_reserved == 80 and sim.tokens_stored() == 20
    while sim.has_unfinished():
        sim.step()
        sim.reap()
    assert sim.slots_reserved == 0 and sim.alloc.num_free == 100
