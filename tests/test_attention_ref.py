"""The torch reference backend against a naive per-token paged attention on random data."""
from __future__ import annotations

import math
import random

import pytest
import torch

from services.executor.attention import AttentionMetadata, get_backend
from services.executor.attention.torch_ref import TorchBackend


def make_meta(q_lens, ctx_lens, tables, with_host=True) -> AttentionMetadata:
    """Metadata as the worker builds it: slots of the new tokens are the last q positions."""
    bs_tables = max(len(t) for t in tables)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    return AttentionMetadata(
        num_seqs=len(q_lens),
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),   # set by the caller
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (bs_tables - len(t)) for t in tables], dtype=torch.int32),
        max_seqlen_q=max(q_lens), max_context_len=max(ctx_lens), is_decode=all(n == 1 for n in q_lens),
        query_lens_host=list(q_lens) if with_host else None,
        context_lens_host=list(ctx_lens) if with_host else None)


def naive_attention(query, kv, q_lens, ctx_lens, tables, scale, window=0):
    """query [T, Hq, D]; one token, one key position at a time. window > 0: the query at position
    pos sees keys pos - window < k <= pos only."""
    hq, hkv, bs = query.shape[1], kv.shape[2], kv.shape[3]
    group = hq // hkv
    out = torch.zeros_like(query)
    row = 0
    for n, c, table in zip(q_lens, ctx_lens, tables):
        for i in range(n):
            pos = c - n + i
            visible = range(max(0, pos - window + 1) if window else 0, pos + 1)
            keys = torch.stack([kv[0, table[j // bs], :, j % bs] for j in visible])   # [L, Hkv, D]
            vals = torch.stack([kv[1, table[j // bs], :, j % bs] for j in visible])
            for h in range(hq):
                s = (keys[:, h // group] @ query[row, h]) * scale                           # [L]
                out[row, h] = s.softmax(0) @ vals[:, h // group]
            row += 1
    return out


def random_case(seed, hq, hkv, specs, bs=4, d=16, num_blocks=64):
    """specs: list of (new tokens, context after the step). Tables are shuffled pool blocks."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    pool = list(range(num_blocks))
    rnd.shuffle(pool)
    kv = torch.randn(2, num_blocks, hkv, bs, d, generator=g)
    q_lens = [n for n, _ in specs]
    ctx_lens = [c for _, c in specs]
    tables = [[pool.pop() for _ in range(-(-c // bs))] for c in ctx_lens]
    T = sum(q_lens)
    query = torch.randn(T, hq, d, generator=g)
    key = torch.randn(T, hkv, d, generator=g)
    value = torch.randn(T, hkv, d, generator=g)
    slots = []
    for n, c, t in zip(q_lens, ctx_lens, tables):
        slots += [t[p // bs] * bs + p % bs for p in range(c - n, c)]
    return kv, query, key, value, q_lens, ctx_lens, tables, torch.tensor(slots)


CASES = {
    "decode": [(1, 1), (1, 7), (1, 16), (1, 33), (1, 4)],
    "prefill": [(5, 5), (1, 1), (12, 12), (4, 4)],
    "chunked": [(3, 11), (8, 8), (1, 20), (6, 30), (2, 2)],
    "mixed": [(1, 9), (17, 17), (1, 1), (5, 13), (1, 40)],
    "uneven": [(2, 2), (64, 64), (3, 7), (1, 5), (2, 30), (2, 3), (2, 2)],   # two padded prefill groups
    "long_alone": [(1, 9), (50, 50), (1, 3)],        # one prefill without cached prefix: plain causal
}


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2)])       # GQA ratio 1 and 3
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_host", [True, False])
def test_write_and_attend_match_naive(hq, hkv, case, with_host):
    kv, query, key, value, q_lens, ctx_lens, tables, slots = random_case(1, hq, hkv, CASES[case])
    meta = make_meta(q_lens, ctx_lens, tables, with_host)
    meta.slot_mapping = slots
    backend = TorchBackend()
    backend.write_kv(kv, key, value, meta)
    bs = kv.shape[3]
    for t, s in enumerate(slots.tolist()):          # the new K/V landed in their slots
        assert torch.equal(kv[0, s // bs, :, s % bs], key[t])
        assert torch.equal(kv[1, s // bs, :, s % bs], value[t])
    scale = 1 / math.sqrt(query.shape[-1])
    got = backend.attend(query, kv, meta, scale)
    want = naive_attention(query, kv, q_lens, ctx_lens, tables, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the per-step plan is cached and reused by the next layer
    again = backend.attend(query, kv, meta, scale)
    torch.testing.assert_close(again, got)


def test_negative_slots_are_skipped():
    kv, query, key, value, q_lens, ctx_lens, tables, slots = random_case(2, 4, 2, [(3, 3), (2, 6)])
    meta = make_meta(q_lens, ctx_lens, tables)
    slots[1] = -1
    slots[4] = -1
    meta.slot_mapping = slots
    before = kv.clone()
    TorchBackend().write_kv(kv, key, value, meta)
    bs = kv.shape[3]
    changed = (kv != before).flatten(2).any(-1).nonzero().tolist()   # (k/v, block) pairs touched
    written = {s // bs for s in slots.tolist() if s >= 0}
    assert {b for _, b in changed} <= written
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kv[0, s // bs, :, s % bs], key[t])


def test_copy_blocks_copies_k_and_v_in_every_layer():
    g = torch.Generator().manual_seed(3)
    caches = [torch.randn(2, 10, 2, 4, 8, generator=g) for _ in range(3)]
    before = [c.clone() for c in caches]
    TorchBackend().copy_blocks(caches, torch.tensor([[1, 7], [4, 2]]))
    for c, b in zip(caches, before):
        assert torch.equal(c[:, 7], b[:, 1]) and torch.equal(c[:, 2], b[:, 4])
        untouched = [i for i in range(10) if i not in (7, 2)]
        assert torch.equal(c[:, untouched], b[:, untouched])


@pytest.mark.integration   # auto builds the C kernels with cc
def test_get_backend_falls_back_to_torch_on_cpu():
    assert type(get_backend("torch", "cpu")) is TorchBackend
    assert isinstance(get_backend("auto", "cpu"), TorchBackend)      # the CPU backend extends it
    with pytest.warns(UserWarning):
        assert type(get_backend("cuda", "cpu")) is TorchBackend
    with pytest.raises(ValueError):
        get_backend("nope", "cpu")


def test_group_prefills_covers_each_sequence_once_within_the_padding_bound():
    from services.executor.attention.torch_ref import PREFILL_PAD_LIMIT, group_prefills
    rnd = random.Random(5)
    for _ in range(200):
        B, bs = rnd.randint(1, 12), rnd.choice([1, 4, 16])
        q_lens = [rnd.choice([1, rnd.randint(2, 8), rnd.randint(2, 300)]) for _ in range(B)]
        ctx_lens = [n + rnd.choice([0, rnd.randint(0, 200)]) for n in q_lens]
        multi = [b for b in range(B) if q_lens[b] > 1]
        groups = group_prefills(multi, q_lens, ctx_lens, bs)
        assert sorted(b for g in groups for b in g) == multi
        for g in groups:
            if len(g) > 1:
                padded = len(g) * max(q_lens[b] for b in g) * (-(-max(ctx_lens[b] for b in g) // bs) * bs)
                assert padded <= PREFILL_PAD_LIMIT * sum(q_lens[b] * ctx_lens[b] for b in g)


# ---------------------------------------------------------------- sliding windows

# 1: each query sees itself only; 3: smaller than a block (bs 4); 6, 20: a few blocks, larger
# than some contexts of a step but not all; 100: larger than every context (full attention)
WINDOWS = [1, 3, 6, 20, 100]


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("window", WINDOWS)
def test_sliding_window_matches_naive(hq, hkv, case, window):
    kv, query, _, _, q_lens, ctx_lens, tables, _ = random_case(4, hq, hkv, CASES[case])
    scale = 1 / math.sqrt(query.shape[-1])
    got = TorchBackend().attend(query, kv, make_meta(q_lens, ctx_lens, tables), scale, window=window)
    want = naive_attention(query, kv, q_lens, ctx_lens, tables, scale, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    full = naive_attention(query, kv, q_lens, ctx_lens, tables, scale)
    if window < max(ctx_lens):                  # some query has keys outside its window
        assert not torch.allclose(got, full, atol=1e-3, rtol=1e-3)
    else:
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_layers_with_different_windows_share_one_meta():
    """Gemma 3 style: global and windowed layers alternate within one step, one meta, one scratch.
    Each layer gets its own window's masks, in any order, and the first layer's plan is reused."""
    kv, query, _, _, q_lens, ctx_lens, tables, _ = random_case(9, 6, 2, CASES["mixed"] + [(4, 30)])
    scale = 0.25
    meta = make_meta(q_lens, ctx_lens, tables)
    backend = TorchBackend()
    want = {w: naive_attention(query, kv, q_lens, ctx_lens, tables, scale, w) for w in (0, 2, 7)}
    for w in (0, 7, 2, 0, 2, 7):
        torch.testing.assert_close(backend.attend(query, kv, meta, scale, window=w), want[w],
                                   atol=1e-5, rtol=1e-5)
    plan = meta.scratch["torch_ref"]
    assert sorted(plan["decode"].windowed) == [2, 7]
    assert all(sorted(p.windowed) == [2, 7] for p in plan["prefill"])
    assert not torch.allclose(want[2], want[7], atol=1e-3) and not torch.allclose(want[0], want[7], atol=1e-3)


def test_window_of_one_is_the_value_of_the_token_itself():
    kv, query, _, _, q_lens, ctx_lens, tables, _ = random_case(5, 4, 2, CASES["chunked"])
    got = TorchBackend().attend(query, kv, make_meta(q_lens, ctx_lens, tables), 0.5, window=1)
    bs, row = kv.shape[3], 0
    for n, c, table in zip(q_lens, ctx_lens, tables):
        for pos in range(c - n, c):
            v = kv[1, table[pos // bs], :, pos % bs]                     # [Hkv, D]
            torch.testing.assert_close(got[row], v.repeat_interleave(2, 0), atol=1e-6, rtol=1e-6)
            row += 1


def test_window_at_least_the_context_is_full_attention_and_bad_windows_raise():
    kv, query, _, _, q_lens, ctx_lens, tables, _ = random_case(6, 4, 2, CASES["mixed"])
    meta = make_meta(q_lens, ctx_lens, tables)
    full = TorchBackend().attend(query, kv, meta, 0.3)
    for w in (max(ctx_lens), max(ctx_lens) + 1, 10 ** 9):
        assert torch.equal(TorchBackend().attend(query, kv, meta, 0.3, window=w), full)
    assert not meta.scratch["torch_ref"]["decode"].windowed          # the full-attention masks served
    for bad in (-1, 2.5, True, None):
        with pytest.raises(ValueError, match="window"):
            TorchBackend().attend(query, kv, meta, 0.3, window=bad)
