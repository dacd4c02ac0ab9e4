"""CPU emulation of the CUDA kernels' index logic (kernels/*.cu), checked against plain attention.

The functions below walk the SAME loops as the kernels, at CTA granularity: grid index ->
(sequence, KV head, head chunk, query tile, partition), the rows of a CTA, the partition bounds,
the PA_TILE key loop with the online softmax (including its -inf guards), the block-table slot
math on the flattened cache, the split-K partial layout and the log-sum-exp reduce with its
binary search over cu_seqlens_q. What happens across the threads of one CTA (which thread loads
which 16-byte piece, the xor-shuffle groups, the row-group sum) is vectorised here with numpy and
checked separately by ``test_thread_map_*``.

The launch configuration comes from the real planner (``cuda.plan_attention``), so the grid the
backend would launch is the grid emulated here. Unused cache slots and blocks are filled with NaN:
any read outside a sequence's context, or any output/partial left unwritten, shows up as NaN.

Sliding windows (the kernels' ``window`` argument) and head_dim 256 are emulated the same way; the
kernels themselves were not run with them: no GPU at hand (tests/test_cuda_backend.py runs them
where one is).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.executor.attention import AttentionMetadata
from services.executor.attention import cuda as cb
from services.executor.attention.torch_ref import TorchBackend

F32 = np.float32
NEG_INF = F32(-np.inf)


# ---------------------------------------------------------------- emulation of paged_attention.cu

def emulate_attention(q, kv, block_tables, context_lens, cu, scale, plan: cb.AttnPlan, window=0):
    """q [T, Hq, D] f32, kv [2, NB, Hkv, BS, D] f32 -> (out, part_out, part_ml) as the kernel writes."""
    T, Hq, D = q.shape
    _, NB, Hkv, BS, _ = kv.shape
    flat = kv.reshape(-1)
    v_plane = NB * Hkv * BS * D                  # V plane offset, in elements
    G = Hq // Hkv
    Gc, C, Tq, P, psize = (plan.heads_per_cta, plan.num_head_chunks, plan.q_per_cta,
                           plan.num_partitions, plan.partition_size)
    out = np.full((T, Hq, D), np.nan, F32)
    part_out = np.full((T, Hq, P, D), np.nan, F32)
    part_ml = np.full((T, Hq, P, 2), np.nan, F32)
    cols = np.arange(D)
    gx, gy, gz = plan.grid
    for bz in range(gz):
        for by in range(gy):
            for bx in range(gx):
                # ---- grid index -> work
                part, q_tile = bx % P, bx // P
                kvh, chunk = by // C, by % C
                b = bz
                q_begin = int(cu[b])
                n_new = int(cu[b + 1]) - q_begin
                ctx = int(context_lens[b])
                prefix = ctx - n_new
                i0 = q_tile * Tq
                if i0 >= n_new or prefix < 0:
                    continue
                n_tok = min(Tq, n_new - i0)
                nrows = n_tok * Gc
                key_end = prefix + i0 + n_tok
                key_lo = max(0, prefix + i0 - window + 1) if window > 0 else 0
                split = psize > 0
                k_begin = max(part * psize, key_lo) if split else key_lo
                k_end = min(part * psize + psize, key_end) if split else key_end
                if k_begin >= k_end:
                    continue
                # ---- rows: (token, head) pairs of one KV head
                q_s = np.zeros((cb.MAX_ROWS, D), F32)
                pos = np.full(cb.MAX_ROWS, -1)
                lo = np.zeros(cb.MAX_ROWS, int)
                rows, heads = np.zeros(cb.MAX_ROWS, int), np.zeros(cb.MAX_ROWS, int)
                for j in range(cb.MAX_ROWS):
                    g = chunk * Gc + j % Gc
                    if j < nrows and g < G:
                        rows[j] = q_begin + i0 + j // Gc
                        heads[j] = kvh * G + g
                        q_s[j] = q[rows[j], heads[j]] * F32(scale)
                        pos[j] = prefix + i0 + j // Gc
                    lo[j] = max(0, prefix + i0 + j // Gc - window + 1) if window > 0 else 0
                m = np.full(cb.MAX_ROWS, NEG_INF, F32)
                l = np.zeros(cb.MAX_ROWS, F32)
                acc = np.zeros((cb.MAX_ROWS, D), F32)
                # ---- key tiles with online softmax
                for t0 in range(k_begin, k_end, cb.TILE):
                    tile_len = min(cb.TILE, k_end - t0)
                    t = t0 + np.arange(tile_len)
                    blk = block_tables[b, t // BS].astype(np.int64)
                    row_off = ((blk * Hkv + kvh) * BS + t % BS) * D      # K row start
                    K = flat[row_off[:, None] + cols]
                    V = flat[v_plane + row_off[:, None] + cols]
                    s = q_s[:nrows] @ K.T                                # phase 1
                    visible = (t[None, :] <= pos[:nrows, None]) & (t[None, :] >= lo[:nrows, None])
                    s = np.where(visible, s, NEG_INF)
                    alpha = np.ones(cb.MAX_ROWS, F32)
                    p = np.zeros_like(s)
                    for j in range(nrows):                              # phase 2
                        m_new = max(m[j], s[j].max())
                        if m_new == NEG_INF:
                            p[j] = 0
                        else:
                            alpha[j] = np.exp(m[j] - m_new)
                            p[j] = np.exp(s[j] - m_new)
                            l[j] = l[j] * alpha[j] + p[j].sum(dtype=F32)
                        m[j] = m_new
                    acc[:nrows] = acc[:nrows] * alpha[:nrows, None] + p @ V    # phase 3
                # ---- write
                for j in range(nrows):
                    if pos[j] < 0:
                        continue
                    o = acc[j] / l[j] if l[j] > 0 else np.zeros(D, F32)
                    if split:
                        part_out[rows[j], heads[j], part] = o
                        part_ml[rows[j], heads[j], part] = (m[j], l[j])
                    else:
                        out[rows[j], heads[j]] = o
    if plan.split:
        emulate_reduce(out, part_out, part_ml, context_lens, cu, plan, window)
    return out, part_out, part_ml


def emulate_reduce(out, part_out, part_ml, context_lens, cu, plan, window=0):
    """paged_attention_reduce_*: grid (Hq, T), one (row, head) per CTA."""
    T, Hq, P, D = part_out.shape
    num_seqs = len(cu) - 1
    for row in range(T):
        for h in range(Hq):
            lo, hi = 0, num_seqs                 # cu[lo] <= row < cu[hi]
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if cu[mid] <= row:
                    lo = mid
                else:
                    hi = mid
            n_new = int(cu[lo + 1] - cu[lo])
            i = row - int(cu[lo])
            pos = int(context_lens[lo]) - n_new + i
            if i < 0 or i >= n_new or pos < 0:
                continue
            n_parts = min(pos // plan.partition_size + 1, P)
            p0 = max(0, pos - window + 1) // plan.partition_size if window > 0 else 0
            ms, ls = part_ml[row, h, p0:n_parts, 0], part_ml[row, h, p0:n_parts, 1]
            mx = ms.max()
            w = np.where(ms == NEG_INF, F32(0), ls * np.exp(ms - mx)).astype(F32)
            tot = w.sum(dtype=F32)
            inv = F32(1) / tot if tot > 0 else F32(0)
            out[row, h] = (w[:, None] * part_out[row, h, p0:n_parts]).sum(0) * inv


# ---------------------------------------------------------------- emulation of cache_ops.cu

def emulate_reshape_and_cache(kv, key, value, slot_mapping, vec):
    """reshape_and_cache_*: grid (T), threads stride over (kv head, 16-byte vector) pairs.
    key/value are numpy arrays with arbitrary (element) strides in their first two dims."""
    _, NB, Hkv, BS, D = kv.shape
    flat = kv.reshape(-1)                        # a view: writes land in kv
    plane = NB * Hkv * BS * D
    kflat, vflat = key.base_flat, value.base_flat
    vecs_per_row = D // vec
    for t, slot in enumerate(slot_mapping):
        if slot < 0:
            continue
        blk, off = slot // BS, slot % BS
        for idx in range(Hkv * vecs_per_row):   # threadIdx.x strides over this
            h, c = idx // vecs_per_row, (idx % vecs_per_row) * vec
            dst = ((blk * Hkv + h) * BS + off) * D + c
            flat[dst:dst + vec] = kflat[key.off + t * key.st + h * key.sh + c:][:vec]
            flat[plane + dst:plane + dst + vec] = vflat[value.off + t * value.st + h * value.sh + c:][:vec]


def emulate_copy_blocks(memory: dict[int, np.ndarray], src_layers, dst_layers, pairs,
                        src_num_blocks, dst_num_blocks, block_bytes):
    """copy_blocks_kernel: grid (P, 2L); memory maps a base "address" to a uint8 buffer."""
    for p in range(len(pairs)):                  # blockIdx.x
        for y in range(2 * len(src_layers)):     # blockIdx.y
            layer, plane = y // 2, y % 2
            s_blk, d_blk = pairs[p]
            s0 = (plane * src_num_blocks + s_blk) * block_bytes
            d0 = (plane * dst_num_blocks + d_blk) * block_bytes
            src, dst = memory[src_layers[layer]], memory[dst_layers[layer]]
            for i in range(block_bytes // 16):   # threadIdx.x strides over 16-byte words
                dst[d0 + 16 * i:d0 + 16 * i + 16] = src[s0 + 16 * i:s0 + 16 * i + 16]


# ---------------------------------------------------------------- test data

def make_case(rng, seqs, hq, hkv, d, bs, extra_blocks=5):
    """seqs: list of (n_new, ctx). Returns numpy q, kv (NaN outside contexts), tables, lens, cu."""
    nblocks = [-(-c // bs) for _, c in seqs]
    NB = 1 + sum(nblocks) + extra_blocks        # block 0: padding target, never assigned
    perm = rng.permutation(np.arange(1, NB))    # shuffled, non-contiguous tables
    max_blocks = max(nblocks) + 2
    tables = np.zeros((len(seqs), max_blocks), np.int32)
    kv = np.full((2, NB, hkv, bs, d), np.nan, F32)
    k_pos = 0
    for b, (_, c) in enumerate(seqs):
        ids = perm[k_pos:k_pos + nblocks[b]]
        k_pos += nblocks[b]
        tables[b, :len(ids)] = ids
        for t in range(c):
            kv[:, ids[t // bs], :, t % bs] = rng.standard_normal((2, hkv, d)).astype(F32)
    T = sum(n for n, _ in seqs)
    q = rng.standard_normal((T, hq, d)).astype(F32)
    cu = np.zeros(len(seqs) + 1, np.int32)
    cu[1:] = np.cumsum([n for n, _ in seqs])
    lens = np.array([c for _, c in seqs], np.int32)
    return q, kv, tables, lens, cu


def reference_attention(q, kv, tables, lens, cu, scale, window=0):
    """Plain softmax attention in float64 on K/V gathered by block table; window > 0: the query
    at pos sees keys pos - window < k <= pos."""
    T, hq, d = q.shape
    _, _, hkv, bs, _ = kv.shape
    G = hq // hkv
    out = np.zeros((T, hq, d))
    for b in range(len(lens)):
        c, n = int(lens[b]), int(cu[b + 1] - cu[b])
        t = np.arange(c)
        K = kv[0, tables[b, t // bs], :, t % bs].astype(np.float64)     # [c, Hkv, D]
        V = kv[1, tables[b, t // bs], :, t % bs].astype(np.float64)
        for i in range(n):
            pos = c - n + i
            lo = max(0, pos - window + 1) if window > 0 else 0
            for h in range(hq):
                s = K[lo:pos + 1, h // G] @ q[cu[b] + i, h] * scale
                p = np.exp(s - s.max())
                out[cu[b] + i, h] = p @ V[lo:pos + 1, h // G] / p.sum()
    return out


def torch_meta(tables, lens, cu, slots=None):
    q_lens = np.diff(cu)
    return AttentionMetadata(
        num_seqs=len(lens),
        slot_mapping=torch.as_tensor(slots if slots is not None else np.zeros(cu[-1]), dtype=torch.int64),
        cu_seqlens_q=torch.as_tensor(cu), context_lens=torch.as_tensor(lens),
        block_tables=torch.as_tensor(tables), max_seqlen_q=int(q_lens.max()),
        max_context_len=int(lens.max()), is_decode=bool((q_lens == 1).all()))


def run_case(rng, seqs, hq, hkv, d, bs, force_split, partition_size=cb.PARTITION_SIZE, window=0):
    q, kv, tables, lens, cu = make_case(rng, seqs, hq, hkv, d, bs)
    scale = 1.0 / math.sqrt(d)
    plan = cb.plan_attention(len(seqs), hq, hkv, int(np.diff(cu).max()), int(lens.max()), len(q), d,
                             force_split=force_split, partition_size=partition_size, window=window)
    assert plan.split == force_split
    out, _, _ = emulate_attention(q, kv, tables, lens, cu, scale, plan, window)
    assert not np.isnan(out).any(), "an output row was never written or read a NaN slot"
    ref = reference_attention(q, kv, tables, lens, cu, scale, window)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # the torch reference backend (the oracle the GPU test uses) agrees on the same data
    kv_t = torch.from_numpy(np.nan_to_num(kv))
    o_t = TorchBackend().attend(torch.from_numpy(q), kv_t, torch_meta(tables, lens, cu), scale, window=window)
    np.testing.assert_allclose(out, o_t.numpy(), rtol=1e-4, atol=1e-4)
    if window and window < int(lens.max()):     # the window mattered for some row
        assert not np.allclose(ref, reference_attention(q, kv, tables, lens, cu, scale), atol=1e-3)
    return plan


# ---------------------------------------------------------------- tests: attention

GQA = [(4, 4), (6, 2), (16, 2)]                  # ratios 1, 3, 8
DECODE_LENS = [1, 15, 16, 17, 100, 513, 1100]    # 1, block edges, > 2 partitions of 512


@pytest.mark.parametrize("hq,hkv", GQA, ids=lambda x: str(x))
@pytest.mark.parametrize("split", [False, True], ids=["single", "splitk"])
def test_decode(hq, hkv, split):
    rng = np.random.default_rng(hq * 10 + split)
    seqs = [(1, c) for c in rng.permutation(DECODE_LENS)]
    plan = run_case(rng, seqs, hq, hkv, d=64, bs=16, force_split=split)
    assert plan.q_per_cta == 1 and plan.heads_per_cta == min(hq // hkv, cb.MAX_ROWS)
    if split:
        assert plan.num_partitions == math.ceil(1100 / cb.PARTITION_SIZE)


@pytest.mark.parametrize("bs,psize", [(16, 40), (32, 48), (16, 100)])
def test_decode_partitions_cross_blocks(bs, psize):
    """Partitions that start and end mid-block, and that are not multiples of PA_TILE."""
    rng = np.random.default_rng(psize)
    seqs = [(1, c) for c in (1, 39, 40, 41, 95, 233)]
    run_case(rng, seqs, 6, 2, d=64, bs=bs, force_split=True, partition_size=psize)


def test_decode_head_dim_128_bs32():
    rng = np.random.default_rng(7)
    run_case(rng, [(1, 70), (1, 5), (1, 600)], 16, 2, d=128, bs=32, force_split=True)


def test_gqa_above_max_rows_uses_head_chunks():
    """G = 12 > 8 rows per CTA: two head chunks, the second half empty."""
    rng = np.random.default_rng(12)
    plan = run_case(rng, [(1, 33), (1, 90)], 12, 1, d=64, bs=16, force_split=False)
    assert (plan.heads_per_cta, plan.num_head_chunks) == (8, 2)
    run_case(rng, [(5, 40), (1, 90)], 12, 1, d=64, bs=16, force_split=True, partition_size=32)


# (n_new, ctx): fresh prompts, chunks over a cached prefix, decode rows mixed in, a 1-token
# prompt, chunk boundaries off the block grid
PREFILL = [(5, 5), (1, 1), (7, 30), (1, 45), (19, 19), (3, 70), (12, 140)]


@pytest.mark.parametrize("hq,hkv", GQA, ids=lambda x: str(x))
@pytest.mark.parametrize("split,psize", [(False, 0), (True, 512), (True, 24)],
                         ids=["single", "splitk512", "splitk24"])
def test_prefill_and_chunked_prefill(hq, hkv, split, psize):
    rng = np.random.default_rng(hq + psize)
    seqs = [PREFILL[i] for i in rng.permutation(len(PREFILL))]
    plan = run_case(rng, seqs, hq, hkv, d=64, bs=16, force_split=split,
                    partition_size=psize or cb.PARTITION_SIZE)
    assert plan.q_per_cta == cb.MAX_ROWS // plan.heads_per_cta
    assert plan.num_q_tiles == math.ceil(19 / plan.q_per_cta)


def test_reduce_skips_unwritten_partials():
    """Partials past a row's causal limit are never written (NaN here); the reduce must not read
    them, and empty-but-written ones (m = -inf, l = 0) must weigh nothing."""
    rng = np.random.default_rng(3)
    q, kv, tables, lens, cu = make_case(rng, [(30, 60)], 2, 2, 64, 16)
    plan = cb.plan_attention(1, 2, 2, 30, 60, 30, 64, force_split=True, partition_size=16)
    out, part_out, part_ml = emulate_attention(q, kv, tables, lens, cu, 0.125, plan)
    # row 0 sits at position 30: partitions 0, 1 (keys 0..31) only; partition 3 unwritten
    assert not np.isnan(part_ml[0, 0, :2]).any() and np.isnan(part_ml[0, 0, 3]).all()
    # the CTA of the first q tile reaches key 30 + 7 = 37, so partition 2 exists for row 0 but
    # holds no visible key: written as empty
    assert part_ml[0, 0, 2, 0] == NEG_INF and part_ml[0, 0, 2, 1] == 0
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, reference_attention(q, kv, tables, lens, cu, 0.125),
                               rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------- tests: sliding window, head_dim 256

@pytest.mark.parametrize("hq,hkv", GQA, ids=lambda x: str(x))
@pytest.mark.parametrize("split", [False, True], ids=["single", "splitk"])
@pytest.mark.parametrize("window", [1, 10, 16, 100, 600, 2000])
def test_decode_sliding_window(hq, hkv, split, window):
    """Windows of one key, below a block (bs 16), one block, across tiles, across partitions of
    512, and past every context (the kernel's own handling: the backend would pass 0 there)."""
    rng = np.random.default_rng(hq * 100 + window + split)
    seqs = [(1, c) for c in rng.permutation(DECODE_LENS)]
    run_case(rng, seqs, hq, hkv, d=64, bs=16, force_split=split, window=window)


@pytest.mark.parametrize("hq,hkv", GQA, ids=lambda x: str(x))
@pytest.mark.parametrize("split,psize", [(False, 0), (True, 512), (True, 24)],
                         ids=["single", "splitk512", "splitk24"])
@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_prefill_sliding_window(hq, hkv, split, psize, window):
    """Prefill tiles whose rows have different window starts; chunks whose window starts inside
    the cached prefix; partitions (24) smaller than the window and holding none of a row's keys."""
    rng = np.random.default_rng(hq + psize + window)
    seqs = [PREFILL[i] for i in rng.permutation(len(PREFILL))]
    run_case(rng, seqs, hq, hkv, d=64, bs=16, force_split=split, partition_size=psize or cb.PARTITION_SIZE,
             window=window)


@pytest.mark.parametrize("split,psize", [(False, 0), (True, 512), (True, 40)], ids=["single", "splitk512", "splitk40"])
@pytest.mark.parametrize("window", [0, 7, 300])
def test_head_dim_256(split, psize, window):
    """Gemma 3's head_dim, decode and prefill rows in one step, GQA 4 (fp32 at 256: two loads per
    thread per row, covered by test_thread_map_covers_tile_once)."""
    rng = np.random.default_rng(256 + window + psize)
    seqs = [(1, 700), (9, 9), (1, 33), (12, 140), (1, 1)]
    run_case(rng, seqs, 8, 2, d=256, bs=32, force_split=split, partition_size=psize or cb.PARTITION_SIZE,
             window=window)


def test_partials_before_the_window_are_neither_written_nor_read():
    """Row at position 99 with window 30 sees keys 70..99: partitions of 16 number 4..6; 0..3
    stay unwritten (NaN here) and the reduce must start at 4."""
    rng = np.random.default_rng(4)
    q, kv, tables, lens, cu = make_case(rng, [(1, 100), (1, 20)], 2, 1, 64, 16)
    plan = cb.plan_attention(2, 2, 1, 1, 100, 2, 64, force_split=True, partition_size=16)
    out, part_out, part_ml = emulate_attention(q, kv, tables, lens, cu, 0.125, plan, window=30)
    assert np.isnan(part_ml[0, :, :4]).all() and not np.isnan(part_ml[0, :, 4:7]).any()
    assert np.isnan(part_ml[1, :, :]).sum() == 2 * 2 * (plan.num_partitions - 2)   # 20 keys: partitions 0, 1
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, reference_attention(q, kv, tables, lens, cu, 0.125, 30), rtol=2e-5, atol=2e-5)


def _fake_cuda_backend(launches):
    """A CudaBackend without a GPU: tensors stay on the CPU and launches are recorded."""
    backend = object.__new__(cb.CudaBackend)
    backend.device, backend.num_sms, backend._layer_ptrs = torch.device("cpu"), 132, {}
    backend._launch = lambda file, name, grid, block, args, shared_mem=0: launches.append((name, grid, args))
    return backend


@pytest.mark.parametrize("seqs", [[(1, 3000), (1, 40)], [(1, 90), (12, 140), (1, 700)]], ids=["decode", "mixed"])
def test_backend_launches_carry_each_layers_window(seqs):
    """CudaBackend.attend, launches recorded: layers with different windows on one meta each pass
    their own window to the attention kernel and the reduce, under a plan cached per window; the
    recorded launch, emulated, matches the reference for that window."""
    rng = np.random.default_rng(len(seqs))
    hq, hkv, d, bs = 8, 2, 256, 16
    q, kv, tables, lens, cu = make_case(rng, seqs, hq, hkv, d, bs)
    meta = torch_meta(tables, lens, cu)
    launches = []
    backend = _fake_cuda_backend(launches)
    splits = []
    for window in (0, 600, 64, 0, 5000, 600, 64):      # 5000 > every context: full attention, window 0
        launches.clear()
        backend.attend(torch.from_numpy(q), torch.from_numpy(np.nan_to_num(kv)), meta, 0.0625, window=window)
        sent = 0 if window >= lens.max() else window
        name, grid, args = launches[0]
        assert name == f"paged_attention_f32_d{d}_bs{bs}" and int(args[-1]) == sent
        plan = meta.scratch[("cuda_plan", hq, hkv, d, sent)]
        assert grid == plan.grid and int(args[-3]) == plan.partition_size
        splits.append((sent, plan.split))
        if plan.split:
            assert launches[1][0] == f"paged_attention_reduce_f32_d{d}" and int(launches[1][2][-1]) == sent
        out, _, _ = emulate_attention(q, kv, tables, lens, cu, float(args[-2]), plan, int(args[-1]))
        np.testing.assert_allclose(out, reference_attention(q, kv, tables, lens, cu, 0.0625, window),
                                   rtol=2e-5, atol=2e-5)
    assert (600, True) in splits and (64, False) in splits          # both kernels, windowed
    assert sorted(k[-1] for k in meta.scratch if k[0] == "cuda_plan") == [0, 64, 600]
    with pytest.raises(ValueError, match="window"):
        backend.attend(torch.from_numpy(q), torch.from_numpy(np.nan_to_num(kv)), meta, 0.0625, window=-3)


def test_split_is_safe_for_large_logits():
    """Scores around 80 overflow exp() in fp32 without the max subtraction."""
    rng = np.random.default_rng(5)
    q, kv, tables, lens, cu = make_case(rng, [(1, 300), (1, 129)], 2, 1, 64, 16)
    q *= 40
    plan = cb.plan_attention(2, 2, 1, 1, 300, 2, 64, force_split=True, partition_size=64)
    out, _, _ = emulate_attention(q, kv, tables, lens, cu, 0.125, plan)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference_attention(q, kv, tables, lens, cu, 0.125),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- tests: planner heuristic

def test_planner_heuristic():
    # small batch, long context: split-K
    p = cb.plan_attention(2, 32, 8, 1, 8192, 2, 128, num_sms=132)
    assert p.split and p.num_partitions == 16 and p.grid == (16, 8, 2)
    # one partition's worth of keys: never split
    assert not cb.plan_attention(1, 32, 8, 1, 512, 1, 128).split
    # big batch, moderate context (<= 8 partitions): single pass
    assert not cb.plan_attention(256, 32, 8, 1, 4096, 256, 128, num_sms=132).split
    # big batch, very long context: split (the longest sequence would be the tail)
    assert cb.plan_attention(256, 32, 8, 1, 8192, 256, 128, num_sms=132).split
    # long prefill: partial buffer over the cap, single pass
    assert not cb.plan_attention(1, 32, 8, 8192, 8192, 8192, 128).split
    # prefill rows per CTA
    p = cb.plan_attention(3, 9, 3, 100, 100, 150, 64)
    assert (p.heads_per_cta, p.q_per_cta, p.num_q_tiles) == (3, 2, 50)
    # sliding window: the choice weighs the keys a row walks; partitions stay absolute when split
    assert cb.plan_attention(128, 32, 8, 1, 32768, 128, 128, window=0).split
    assert not cb.plan_attention(128, 32, 8, 1, 32768, 128, 128, window=4096).split
    assert not cb.plan_attention(2, 32, 8, 1, 8192, 2, 128, window=512).split      # one partition's worth
    p = cb.plan_attention(2, 32, 8, 1, 8192, 2, 128, window=2048)
    assert p.split and p.num_partitions == 16


# ---------------------------------------------------------------- tests: thread maps

@pytest.mark.parametrize("elem,d", [(2, 64), (2, 128), (2, 256), (4, 64), (4, 128), (4, 256)])
def test_thread_map_covers_tile_once(elem, d):
    """Inside a CTA: row r = s*RPI + tid/TPR, columns (v*TPR + tid%TPR)*VEC + e for v < NV. Every
    (row, column) of a PA_TILE x HEAD_DIM tile is loaded by exactly one (thread, sweep, load,
    element); a row's TPR lanes form an aligned group inside one warp (the xor-shuffle reduction
    stays inside it); load v of a warp's TPR lanes is one contiguous TPR*16-byte run per row."""
    vec = 16 // elem
    tpr = min(d // vec, 32)
    nv = d // (tpr * vec)
    rpi = cb.NUM_THREADS // tpr
    assert nv * tpr * vec == d and 32 % tpr == 0 and cb.TILE % rpi == 0
    assert nv == (2 if (elem, d) == (4, 256) else 1)
    hits = np.zeros((cb.TILE, d), int)
    for tid in range(cb.NUM_THREADS):
        for s in range(cb.TILE // rpi):
            r = s * rpi + tid // tpr
            for v in range(nv):
                c = (tid % tpr) * vec + v * tpr * vec
                hits[r, c:c + vec] += 1
        # xor partners (offsets < tpr) share the row and the warp
        for o in (1 << k for k in range(int(math.log2(tpr)))):
            assert (tid ^ o) // tpr == tid // tpr and (tid ^ o) // 32 == tid // 32
    assert (hits == 1).all()


# ---------------------------------------------------------------- tests: cache ops

class _Strided:
    """A [T, Hkv, D] view into a flat buffer: what the kernel sees (pointer + strides)."""
    def __init__(self, base, off, st, sh):
        self.base_flat, self.off, self.st, self.sh = base, off, st, sh


@pytest.mark.parametrize("dtype,bs", [(torch.float16, 16), (torch.float32, 32)])
def test_reshape_and_cache(dtype, bs):
    rng = np.random.default_rng(1)
    T, hkv, d, NB = 9, 3, 64, 6
    # key/value as slices of a fused [T, (Hq + 2*Hkv) * D] projection: strided, last dim contiguous
    fused = torch.from_numpy(rng.standard_normal((T, (4 + 2 * hkv) * d)).astype(F32)).to(dtype)
    key = fused[:, 4 * d:(4 + hkv) * d].view(T, hkv, d)
    value = fused[:, (4 + hkv) * d:].view(T, hkv, d)
    slots = rng.choice(NB * bs, T, replace=False).astype(np.int64)
    slots[[2, 5]] = -1                                            # padding tokens
    kv_ref = torch.zeros((2, NB, hkv, bs, d), dtype=dtype)
    TorchBackend().write_kv(kv_ref, key, value, torch_meta(np.zeros((1, 1), np.int32),
                                                           np.array([1], np.int32),
                                                           np.array([0, T], np.int32), slots))
    kv = np.zeros((2, NB, hkv, bs, d), F32)
    flat = fused.float().numpy().reshape(-1)
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    row = fused.stride(0)
    emulate_reshape_and_cache(kv, _Strided(flat, 4 * d, row, d), _Strided(flat, (4 + hkv) * d, row, d),
                              slots, vec)
    np.testing.assert_array_equal(kv, kv_ref.float().numpy())
    assert np.count_nonzero(kv.reshape(2, -1, d).any(-1)) == 2 * (T - 2) * hkv


def test_copy_blocks_and_swap():
    rng = np.random.default_rng(2)
    L, hkv, bs, d, NB, NH = 3, 2, 16, 64, 10, 4
    caches = [torch.from_numpy(rng.standard_normal((2, NB, hkv, bs, d)).astype(np.float16))
              for _ in range(L)]
    host = [torch.zeros((2, NH, hkv, bs, d), dtype=torch.float16) for _ in range(L)]
    block_bytes = hkv * bs * d * 2
    # "addresses" of every pool; memory holds their bytes (numpy views share memory with torch)
    memory = {}
    for i, t in enumerate(caches + host):
        memory[1000 + i] = t.numpy().view(np.uint8).reshape(-1)
    dev_ptrs, host_ptrs = [1000 + i for i in range(L)], [1000 + L + i for i in range(L)]

    # copy-on-write within the device pools, one "launch" for all layers
    pairs = [(3, 7), (0, 9), (5, 1)]
    expect = [c.clone() for c in caches]
    TorchBackend().copy_blocks(expect, torch.tensor(pairs))
    emulate_copy_blocks(memory, dev_ptrs, dev_ptrs, pairs, NB, NB, block_bytes)
    for c, e in zip(caches, expect):
        assert torch.equal(c, e)

    # swap out (device -> host pool of a different size), then back in to other device blocks
    out_pairs = [(7, 2), (4, 0)]
    emulate_copy_blocks(memory, dev_ptrs, host_ptrs, out_pairs, NB, NH, block_bytes)
    for c, h in zip(caches, host):
        assert torch.equal(h[:, [2, 0]], c[:, [7, 4]]) and not h[:, [1, 3]].any()
    in_pairs = [(2, 8), (0, 6)]
    saved = [c[:, [7, 4]].clone() for c in caches]
    emulate_copy_blocks(memory, host_ptrs, dev_ptrs, in_pairs, NH, NB, block_bytes)
    for c, s in zip(caches, saved):
        assert torch.equal(c[:, [8, 6]], s)


def test_backend_copy_blocks_is_one_launch_over_one_pool():
    """CudaBackend.copy_blocks' launch (grid, layer pointer table, pairs, sizes), emulated on the host."""
    rng = np.random.default_rng(3)
    L, NB = 3, 10
    caches = [torch.from_numpy(rng.standard_normal((2, NB, 2, 16, 64)).astype(np.float16)) for _ in range(L)]
    pairs = torch.tensor([[3, 7], [0, 9], [5, 1]])
    expect = [c.clone() for c in caches]
    TorchBackend().copy_blocks(expect, pairs)
    backend = object.__new__(cb.CudaBackend)           # no GPU: only the launch itself is replaced
    backend.device, backend._layer_ptrs = torch.device("cpu"), {}
    launches = []
    backend._launch = lambda file, name, grid, block, args: launches.append((file, name, grid, args))
    backend.copy_blocks(caches, pairs)
    [(file, name, grid, (src, dst, pairs_ptr, src_nb, dst_nb, block_bytes))] = launches
    [table] = backend._layer_ptrs.values()
    assert (file, name, grid) == ("cache_ops.cu", "copy_blocks_kernel", (3, 2 * L))
    assert src == dst == table.data_ptr() and pairs_ptr == pairs.data_ptr() and src_nb == dst_nb == NB
    memory = {c.data_ptr(): c.numpy().view(np.uint8).reshape(-1) for c in caches}
    emulate_copy_blocks(memory, table.tolist(), table.tolist(), pairs.tolist(), NB, NB, int(block_bytes))
    for c, e in zip(caches, expect):
        assert torch.equal(c, e)
