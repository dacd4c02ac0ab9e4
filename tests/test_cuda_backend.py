"""The CUDA kernels (services/executor/attention/cuda.py) against the torch reference backend.

Needs CuPy (the `gpu` extra) and a CUDA device; skipped cleanly otherwise.

Tolerances. The kernels accumulate in fp32 and round once at the output, so against the torch
reference run on the SAME data upcast to fp32 they differ by about one output rounding:
fp16 atol = rtol = 2e-3, bf16 atol = rtol = 1.6e-2 (bf16 has 8 mantissa bits: 2^-8 = 3.9e-3
relative per rounding, and the reference rounds P too when it runs in bf16), fp32 1e-4.
Against the reference run natively in fp16/bf16 the same bounds hold with a factor 2.
Block copies and cache writes are exact.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

# PAGEDSERVE_KERNEL_TARGET=host runs these same tests on the CPU: the kernel files compiled by the
# host C++ compiler (services/executor/attention/host_kernels.py), launched through CudaBackend.
# tests/test_kernels_host.py does that in a subprocess; PAGEDSERVE_KERNEL_SCHEDULE picks the
# order threads run in between barriers there.
HOST = os.environ.get("PAGEDSERVE_KERNEL_TARGET", "cuda") == "host"
if not HOST:
    cp = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("CUDA device not available", allow_module_level=True)

from services.executor.attention import AttentionMetadata  # noqa: E402
from services.executor.attention import cuda as cb  # noqa: E402
from services.executor.attention.torch_ref import TorchBackend  # noqa: E402

pytestmark = [pytest.mark.kernels, pytest.mark.integration] if HOST else pytest.mark.gpu   # host: it compiles
DEV = torch.device("cpu" if HOST else "cuda")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}
GQA = [(8, 8), (12, 4), (32, 4)]          # ratios 1, 3, 8


@pytest.fixture(scope="module")
def backend():
    if HOST:
        from services.executor.attention.host_kernels import HostCudaBackend, HostLauncher
        return HostCudaBackend(HostLauncher(os.environ.get("PAGEDSERVE_KERNEL_SCHEDULE", "shuffled")))
    return cb.CudaBackend(DEV)


def make_case(seqs, hq, hkv, d, bs, dtype, seed=0, extra_blocks=7):
    """seqs: [(n_new, ctx)]. Cache filled for every context slot; shuffled block tables."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nblocks = [-(-c // bs) for _, c in seqs]
    NB = 1 + sum(nblocks) + extra_blocks
    perm = torch.randperm(NB - 1, generator=g) + 1           # block 0 = padding only
    tables = torch.zeros((len(seqs), max(nblocks) + 1), dtype=torch.int32)
    kv = torch.zeros((2, NB, hkv, bs, d), dtype=dtype)
    k = 0
    for b, (_, c) in enumerate(seqs):
        ids = perm[k:k + nblocks[b]]
        k += nblocks[b]
        tables[b, :len(ids)] = ids.int()
        t = torch.arange(c)
        kv[:, ids[t // bs], :, t % bs] = torch.randn((2, c, hkv, d), generator=g).to(dtype).transpose(0, 1)
    T = sum(n for n, _ in seqs)
    q = torch.randn((T, hq, d), generator=g).to(dtype)
    q_lens = [n for n, _ in seqs]
    ctx = [c for _, c in seqs]
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    # slots of the new tokens (the last n_new positions of each context)
    slots = torch.cat([tables[b, (torch.arange(c - n, c) // bs)].long() * bs + torch.arange(c - n, c) % bs
                       for b, (n, c) in enumerate(seqs)])
    meta = AttentionMetadata(
        num_seqs=len(seqs), slot_mapping=slots.to(DEV), cu_seqlens_q=cu.to(DEV),
        context_lens=torch.tensor(ctx, dtype=torch.int32).to(DEV), block_tables=tables.to(DEV),
        max_seqlen_q=max(q_lens), max_context_len=max(ctx), is_decode=all(n == 1 for n in q_lens),
        query_lens_host=q_lens, context_lens_host=ctx)
    return q.to(DEV), kv.to(DEV), meta


def fresh(meta: AttentionMetadata) -> AttentionMetadata:
    """Same step, empty scratch (so another backend or plan builds its own)."""
    return AttentionMetadata(**{**meta.__dict__, "scratch": {}})


def check_attention(backend, q, kv, meta, dtype, plan=None, window=0):
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = backend.attend(q, kv, fresh(meta), scale, window=window, plan=plan)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    ref32 = TorchBackend().attend(q.float(), kv.float(), fresh(meta), scale, window=window)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref32, atol=tol, rtol=tol)
    ref = TorchBackend().attend(q, kv, fresh(meta), scale, window=window)
    torch.testing.assert_close(out.float(), ref.float(), atol=2 * tol, rtol=2 * tol)
    return out


DECODE_LENS = [1, 7, 16, 33, 511, 512, 513, 1000, 2049, 4095, 8192]
if HOST:                       # fibers are slow: up to a few thousand keys (one 3000-key split case below)
    DECODE_LENS = DECODE_LENS[:-2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GQA, ids=str)
def test_decode_ragged(backend, dtype, d, hq, hkv):
    seqs = [(1, c) for c in DECODE_LENS]
    q, kv, meta = make_case(seqs, hq, hkv, d, 16, dtype, seed=hq + d)
    check_attention(backend, q, kv, meta, dtype)                       # the heuristic's choice
    for split in (False, True):                                         # and both variants
        plan = cb.plan_attention(meta.num_seqs, hq, hkv, 1, meta.max_context_len, q.shape[0], d,
                                 backend.num_sms, force_split=split)
        check_attention(backend, q, kv, meta, dtype, plan)


@pytest.mark.parametrize("bs", [16, 32])
def test_decode_fp32_and_block_sizes(backend, bs):
    q, kv, meta = make_case([(1, c) for c in (1, 31, 600, 1500)], 6, 2, 64, bs, torch.float32)
    check_attention(backend, q, kv, meta, torch.float32)


def test_split_equals_single(backend):
    q, kv, meta = make_case([(1, 3000), (1, 17)], 32, 8, 128, 16, torch.float16, seed=3)
    s = 1 / math.sqrt(128)
    outs = [backend.attend(q, kv, fresh(meta), s, plan=cb.plan_attention(
        2, 32, 8, 1, 3000, 2, 128, backend.num_sms, force_split=f)) for f in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-3, rtol=1e-3)


PREFILL = [(37, 37), (1, 1), (16, 80), (1, 700), (100, 1124), (5, 6), (64, 64), (1, 9)]
if HOST:                       # a chunk of 40 over a 520-token prefix still crosses a 512-key partition
    PREFILL[4] = (40, 560)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GQA, ids=str)
def test_prefill_and_chunked_prefill(backend, dtype, d, hq, hkv):
    """Fresh prompts, chunks over a cached prefix, decode rows: one mixed step. The new tokens'
    K/V are written by write_kv first, exactly as the model does."""
    q, kv, meta = make_case(PREFILL, hq, hkv, d, 16, dtype, seed=d + hq)
    T = q.shape[0]
    key = torch.randn((T, hkv, d), device=DEV).to(dtype)
    value = torch.randn((T, hkv, d), device=DEV).to(dtype)
    kv_ref = kv.clone()
    TorchBackend().write_kv(kv_ref, key, value, fresh(meta))
    backend.write_kv(kv, key, value, fresh(meta))
    assert torch.equal(kv, kv_ref)
    check_attention(backend, q, kv, meta, dtype)
    plan = cb.plan_attention(meta.num_seqs, hq, hkv, meta.max_seqlen_q, meta.max_context_len, T, d,
                             backend.num_sms, force_split=True)
    check_attention(backend, q, kv, meta, dtype, plan)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("window", [1, 10, 600])
def test_sliding_window(backend, dtype, d, window):
    """Windows of one key, below a block, across partitions; a mixed step, both kernel variants.
    Not run here when it was written: no GPU at hand (the index logic is emulated on the CPU in
    tests/test_kernel_emulation.py)."""
    q, kv, meta = make_case(PREFILL, 8, 2, d, 16, dtype, seed=window + d)
    check_attention(backend, q, kv, meta, dtype, window=window)
    for split in (False, True):
        plan = cb.plan_attention(meta.num_seqs, 8, 2, meta.max_seqlen_q, meta.max_context_len, q.shape[0], d,
                                 backend.num_sms, force_split=split)
        check_attention(backend, q, kv, meta, dtype, plan, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_head_dim_256(backend, dtype):
    q, kv, meta = make_case([(1, c) for c in DECODE_LENS], 8, 4, 256, 32, dtype, seed=256)
    check_attention(backend, q, kv, meta, dtype)
    check_attention(backend, q, kv, meta, dtype, window=1024)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_write_kv_strided_and_skipped_slots(backend, dtype):
    T, hq, hkv, d, bs, NB = 20, 8, 2, 128, 16, 9
    fused = torch.randn((T, (hq + 2 * hkv) * d), device=DEV).to(dtype)   # a fused QKV output
    key = fused[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    value = fused[:, (hq + hkv) * d:].view(T, hkv, d)
    slots = torch.randperm(NB * bs)[:T].to(DEV)
    slots[[0, 7, 19]] = -1
    meta = AttentionMetadata(1, slots, torch.tensor([0, T], dtype=torch.int32, device=DEV),
                             torch.tensor([T], dtype=torch.int32, device=DEV),
                             torch.zeros((1, 2), dtype=torch.int32, device=DEV), T, T, False)
    kv = torch.zeros((2, NB, hkv, bs, d), dtype=dtype, device=DEV)
    ref = kv.clone()
    backend.write_kv(kv, key, value, fresh(meta))
    TorchBackend().write_kv(ref, key, value, fresh(meta))
    assert torch.equal(kv, ref)


def test_copy_blocks_all_layers_one_launch(backend):
    caches = [torch.randn((2, 12, 4, 16, 64), device=DEV).half() for _ in range(5)]
    ref = [c.clone() for c in caches]
    pairs = torch.tensor([[1, 4], [7, 0], [11, 2], [3, 9]], dtype=torch.int64)
    backend.copy_blocks(caches, pairs)
    TorchBackend().copy_blocks(ref, pairs)
    for c, r in zip(caches, ref):
        assert torch.equal(c, r)
    backend.copy_blocks(caches, torch.empty((0, 2), dtype=torch.int64))   # no-op


@pytest.mark.skipif(HOST, reason="host synchronisation is a GPU matter")
def test_no_host_sync(backend):
    """After warm-up, a decode step's kernels run without any host synchronisation."""
    q, kv, meta = make_case([(1, 900), (1, 40)], 8, 2, 64, 16, torch.float16)
    key = torch.randn((2, 2, 64), device=DEV).half()
    pairs = torch.tensor([[1, 2]], device=DEV)
    for _ in range(2):
        m = fresh(meta)
        torch.cuda.set_sync_debug_mode("error" if _ else "default")
        try:
            backend.write_kv(kv, key, key, m)
            backend.attend(q, kv, m, 0.125)
            backend.copy_blocks([kv], pairs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_the_executor_on_these_kernels_equals_the_torch_backend(backend):
    """The whole executor on random weights of the default model's shapes (30 layers, 9 query and 3
    KV heads of 64), float32: greedy tokens with the kernels equal the torch backend's, through
    chunked prefill, a prefix hit, a fork and swap preemption on a pool too small for the batch."""
    from services.executor.worker import Worker
    from services.offline import Engine
    from shared.config import CacheConfig, EngineConfig, SchedulerConfig
    from shared.messages import AddRequest, SamplingParams

    config = EngineConfig(model="random:smollm2-135m", device=DEV.type, dtype="float32", attention_backend="torch",
                          cache=CacheConfig(block_size=16, num_blocks=10, num_host_blocks=32),
                          scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
                                                    preemption_mode="swap")).validate()
    reference = Engine(config)
    worker = Worker.from_loaded(reference.worker.loaded, config)
    worker.backend = backend
    kernels = Engine(config, worker=worker)
    g = torch.Generator().manual_seed(3)
    shared_prefix = torch.randint(3, 49152, (40,), generator=g).tolist()
    prompts = {"a": shared_prefix + [7, 8, 9], "b": shared_prefix + [11],
               "c": torch.randint(3, 49152, (70,), generator=g).tolist(), "d": [5, 6]}
    greedy = {rid: SamplingParams(n=2 if rid == "c" else 1, max_tokens=10, temperature=0.0, ignore_eos=True)
              for rid in prompts}
    got = {}
    for name, engine in (("torch", reference), ("kernels", kernels)):
        got[name] = engine.run([AddRequest(request_id=rid, prompt_token_ids=ids, sampling=greedy[rid])
                                for rid, ids in prompts.items()])
        assert engine.scheduler.num_free_blocks == engine.ready.num_blocks
        assert engine.scheduler.num_preemptions > 0 and engine.scheduler.stats().prefix_cache_hits > 0
    for rid in prompts:
        want = [s.token_ids for s in got["torch"][rid]]
        assert [s.token_ids for s in got["kernels"][rid]] == want, rid
        assert all(len(t) == 10 for t in want)
    if HOST:
        assert backend.launcher.launches > 0
