"""services/gateway/routing.py: which engine a new request goes to behind one gateway."""
from __future__ import annotations

import pytest

from services.gateway.routing import Router

BS = 4
SHARED = list(range(100, 112))          # three full blocks


def test_a_shared_prefix_follows_the_engine_that_took_it_first():
    r = Router("prefix")
    first = r.pick([0, 0], [0, 0], SHARED + [1, 2], BS)
    assert first == 0                                    # no known prefix: the least loaded (first on ties)
    loads = [1, 0]                                       # engine 0 now busier, within the slack
    assert r.pick(loads, [0, 0], SHARED + [7, 8, 9, 10, 11], BS) == 0
    assert r.pick(loads, [0, 0], [5] * 12, BS) == 1      # a new prefix: the least loaded
    assert r.affinity_hits == 1


def test_the_longest_known_prefix_wins():
    r = Router("prefix")
    r.pick([0, 0], [0, 0], SHARED[:4], BS)               # one block -> engine 0
    r.pick([5, 0], [0, 0], SHARED[:4] + [9] * 8, BS)     # shares block 1 with engine 0 (load 5 is in slack) -> 0
    r.pick([9, 0], [0, 0], SHARED, BS)                   # engine 0 too busy: 1, which now owns all three blocks
    assert r.pick([4, 4], [0, 0], SHARED + [1], BS) == 1
    assert r.pick([4, 4], [0, 0], SHARED[:4] + [9] * 8 + [1], BS) == 0


def test_a_busy_engine_loses_its_prefix_to_balance():
    r = Router("prefix", balance_slack=2)
    r.pick([0, 0], [0, 0], SHARED, BS)
    assert r.pick([3, 0], [0, 0], SHARED, BS) == 1       # 3 more than the least: past the slack
    assert r.pick([2, 0], [0, 0], SHARED, BS) == 1       # and the prefix moved with it


def test_an_engine_that_is_down_or_restarted_is_not_chosen_for_its_old_prefixes():
    r = Router("prefix")
    r.pick([0, 5], [0, 0], SHARED, BS)                   # engine 0
    assert r.pick([None, 5], [0, 0], SHARED, BS) == 1    # down
    r = Router("prefix")
    r.pick([0, 5], [0, 0], SHARED, BS)
    assert r.pick([1, 0], [1, 0], SHARED, BS) == 1       # engine 0 came back with an empty cache


def test_tenants_with_other_salts_do_not_attract_each_other():
    r = Router("prefix")
    r.pick([0, 0], [0, 0], SHARED, BS, salt="a")
    assert r.pick([1, 0], [0, 0], SHARED, BS, salt="b") == 1
    assert r.pick([1, 1], [0, 0], SHARED, BS, salt="a") == 0


def test_partial_blocks_and_short_prompts_have_no_prefix():
    assert Router.block_hashes([1, 2, 3], BS, None) == []
    assert len(Router.block_hashes(list(range(9)), BS, None)) == 2
    assert Router.block_hashes(SHARED, 0, None) == []    # block size unknown yet
    a, b = Router.block_hashes(SHARED, BS, None), Router.block_hashes(SHARED[:4] + [0] * 8, BS, None)
    assert a[0] == b[0] and a[1:] != b[1:]               # chained: equal only up to the first difference


def test_the_index_is_bounded():
    r = Router("prefix", max_entries=5)
    for i in range(10):
        r.pick([0, 0], [0, 0], [i] * 8, BS)
    assert len(r._index) == 5


def test_least_loaded_and_round_robin():
    ll = Router("least-loaded")
    ll.pick([0, 0], [0, 0], SHARED, BS)
    assert ll.pick([1, 0], [0, 0], SHARED, BS) == 1      # no affinity
    assert [ll.pick([0, 0, 3], [0] * 3, [i] * 8, BS) for i in range(4)] == [1, 0, 1, 0]   # ties in turn
    rr = Router("round-robin")
    assert [rr.pick([0, 9, 0], [0, 0, 0], SHARED, BS) for _ in range(4)] == [0, 1, 2, 0]
    assert rr.pick([0, None, 0], [0, 0, 0], SHARED, BS) in (0, 2)
    with pytest.raises(ValueError, match="routing policy must be one of prefix, least-loaded, round-robin"):
        Router("random")
