"""Prefix-cache keys (services/scheduler/block_hash.py): SHA-256 chains over a canonical encoding."""
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.block_hash import (ROOT, HashChain, chain_digest, encode_key, encode_tokens,
                                           root_digest)
from services.scheduler.block_manager import BlockManager

token_lists = st.lists(st.integers(0, 2**64 - 1), max_size=40)
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8) | st.binary(max_size=8)
extra_keys = st.recursive(scalars, lambda inner: st.tuples(inner) | st.tuples(inner, inner)
                          | st.lists(inner, max_size=3).map(tuple), max_leaves=8)


def block_input(tokens, extra):
    return encode_tokens(tokens) + encode_key(extra)


def same_key(a, b) -> bool:
    """Equal as keys: same value *and* same types throughout (True == 1 in Python, not here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(map(same_key, a, b))
    return a == b


@settings(max_examples=400, deadline=None)
@given(token_lists, extra_keys, token_lists, extra_keys)
def test_the_encoding_is_injective(t1, e1, t2, e2):
    """Different (tokens, extra keys) never encode to the same bytes (the parent digest is a
    fixed 32 bytes in front, so the whole block input is injective too)."""
    if t1 == t2 and same_key(e1, e2):
        assert block_input(t1, e1) == block_input(t2, e2)
    else:
        assert block_input(t1, e1) != block_input(t2, e2)


@settings(max_examples=200, deadline=None)
@given(st.lists(extra_keys, min_size=1, max_size=4))
def test_extra_key_encodings_are_prefix_free(keys):
    """Concatenations decode one way: no encoding is a proper prefix of another's."""
    codes = [encode_key(k) for k in keys]
    for a in codes:
        for b in codes:
            assert a == b or not b.startswith(a)


def test_known_ambiguities_of_naive_encodings_are_told_apart():
    assert encode_key(("ab", "c")) != encode_key(("a", "bc"))
    keys = [(1,), True, 1, 0, None, "", b"", (), -1, 255, "1", b"1", ((),), ((), ())]
    assert len({encode_key(k) for k in keys}) == len(keys)
    assert encode_tokens([]) != encode_tokens([0]) and encode_tokens([256]) != encode_tokens([1, 0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32), min_size=4 * 6, max_size=4 * 6), st.integers(0, 4 * 6 - 1),
       st.integers(0, 2**32))
def test_changing_a_token_changes_its_block_digest_and_every_later_one(tokens, pos, value):
    if tokens[pos] == value:
        value += 1
    changed = tokens[:pos] + [value] + tokens[pos + 1:]
    a, b = HashChain(4), HashChain(4)
    for i in range(6):
        assert (a.digest(i, tokens) == b.digest(i, changed)) == (i < pos // 4)


def test_a_salt_changes_every_digest_and_equal_salts_agree():
    tokens = list(range(16))
    chains = {salt: [HashChain(4, salt).digest(i, tokens) for i in range(4)] for salt in (None, "a", "b")}
    assert chains[None][0] == chain_digest(ROOT, tokens[:4])
    for x in chains:
        for y in chains:
            assert (chains[x][3] == chains[y][3]) == (x == y)
    assert [HashChain(4, "a").digest(i, tokens) for i in range(4)] == chains["a"]
    assert root_digest("") != root_digest(None) == ROOT


def test_digests_are_sha256_and_the_block_manager_agrees_with_the_chain():
    bm = BlockManager(8, 4)
    tokens = [5, 6, 7, 8, 9, 10, 11, 12]
    d0 = bm.block_hash(None, tokens[:4])
    assert len(d0) == 32 and bm.block_hash(d0, tokens[4:]) == HashChain(4).digest(1, tokens)


def test_a_token_id_that_fits_no_uint64_is_refused():
    for bad in (-1, 2**64):
        try:
            encode_tokens([bad])
        except OverflowError:
            continue
        raise AssertionError(f"{bad} encoded")
