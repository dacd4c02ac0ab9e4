"""The CPU kernels (kernels/cpu_kernels.c): the CPU backend's decode attention against the torch
reference and the naive per-token attention on random paged caches, the fused add + RMSNorm, and
their build, cache and fallbacks."""
from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

from services.executor.attention import get_backend
from services.executor.attention.base import NormKernel
from services.executor.attention.cpu import CpuBackend
from services.executor.attention.cpu_kernels import CpuKernelUnavailable, build_library, load_kernels
from services.executor.attention.torch_ref import TorchBackend
from tests.test_attention_ref import CASES, WINDOWS, make_meta, naive_attention, random_case

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="needs a C compiler")


@needs_cc
@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 16), (6, 2, 16), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bs", [4, 16])
def test_cpu_backend_matches_the_reference_and_naive(hq, hkv, d, case, bs):
    kv, query, key, value, q_lens, ctx_lens, tables, slots = random_case(7, hq, hkv, CASES[case], bs=bs, d=d,
                                                                         num_blocks=96)
    meta = make_meta(q_lens, ctx_lens, tables)
    meta.slot_mapping = slots
    cpu, ref = CpuBackend(), TorchBackend()
    cpu.write_kv(kv, key, value, meta)
    scale = 1 / math.sqrt(d)
    got = cpu.attend(query, kv, meta, scale)
    torch.testing.assert_close(got, ref.attend(query, kv, make_meta(q_lens, ctx_lens, tables), scale),
                               atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got, naive_attention(query, kv, q_lens, ctx_lens, tables, scale),
                               atol=1e-5, rtol=1e-5)
    if any(n == 1 for n in q_lens):                          # the decode rows went through the kernel:
        assert meta.scratch["torch_ref"]["decode"].kv_rows is None          # nothing was gathered


@needs_cc
@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 16), (9, 3, 64), (8, 2, 256)])     # 256: Gemma 3
@pytest.mark.parametrize("case", ["decode", "mixed", "chunked"])
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("window", WINDOWS)
def test_cpu_backend_sliding_window_matches_the_reference_and_naive(hq, hkv, d, case, bs, window):
    """Windows of 1, below a block, across blocks, above some contexts and above all of them."""
    kv, query, _, _, q_lens, ctx_lens, tables, _ = random_case(8, hq, hkv, CASES[case], bs=bs, d=d, num_blocks=96)
    scale = 1 / math.sqrt(d)
    meta = make_meta(q_lens, ctx_lens, tables)
    got = CpuBackend().attend(query, kv, meta, scale, window=window)
    torch.testing.assert_close(got, TorchBackend().attend(query, kv, make_meta(q_lens, ctx_lens, tables), scale,
                                                          window=window), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got, naive_attention(query, kv, q_lens, ctx_lens, tables, scale, window),
                               atol=1e-5, rtol=1e-5)
    assert meta.scratch["torch_ref"]["decode"].kv_rows is None             # the kernel took the decode rows


@needs_cc
@pytest.mark.parametrize("window", [1, 5, 16, 17, 40, 333])
def test_decode_kernel_window_on_long_contexts(window):
    """The kernel itself (no window shortcut): rows whose window starts mid-block, on a block edge,
    at key 0, or covers the whole context; each row checked against the naive attention."""
    hq, hkv, d, bs = 6, 2, 32, 16
    specs = [(1, c) for c in (1, 5, 16, 17, 39, 40, 41, 200, 333, 700)]
    kv, query, _, _, q_lens, ctx_lens, tables, _ = random_case(12, hq, hkv, specs, bs=bs, d=d, num_blocks=120)
    meta = make_meta(q_lens, ctx_lens, tables)
    dec = TorchBackend()._plan(meta, kv)["decode"]
    got = load_kernels().decode(query, kv, dec.tables, dec.ctx, 0.2, window)
    torch.testing.assert_close(got, naive_attention(query, kv, q_lens, ctx_lens, tables, 0.2, window),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[-1], load_kernels().decode(query, kv, dec.tables, dec.ctx, 0.2)[-1], atol=1e-3)
    with pytest.raises(ValueError, match="window -1"):
        load_kernels().decode(query, kv, dec.tables, dec.ctx, 0.2, -1)


@needs_cc
def test_cpu_backend_layers_with_different_windows_share_one_meta():
    """Windowed and global layers alternating on one meta: the kernel's decode rows and the
    reference's prefill masks each follow the layer's own window."""
    kv, query, _, _, q_lens, ctx_lens, tables, _ = random_case(14, 6, 2, CASES["mixed"] + [(1, 28)])
    meta = make_meta(q_lens, ctx_lens, tables)
    backend = CpuBackend()
    want = {w: naive_attention(query, kv, q_lens, ctx_lens, tables, 0.25, w) for w in (0, 3, 9)}
    for w in (3, 0, 9, 3, 9, 0):
        torch.testing.assert_close(backend.attend(query, kv, meta, 0.25, window=w), want[w], atol=1e-5, rtol=1e-5)
    assert meta.scratch["torch_ref"]["decode"].kv_rows is None
    assert not torch.allclose(want[3], want[9], atol=1e-3)


@needs_cc
def test_reference_fallback_of_the_cpu_backend_honours_the_window():
    """bfloat16 and a GQA group past the kernel's limit take the reference path: same window."""
    kernel = load_kernels()
    for hq, hkv, dtype in ((4, 2, torch.bfloat16), (2 * kernel.max_group, 1, torch.float32)):
        kv, query, _, _, q_lens, ctx_lens, tables, _ = random_case(13, hq, hkv, CASES["mixed"])
        kv, query = kv.to(dtype), query.to(dtype)
        meta = make_meta(q_lens, ctx_lens, tables)
        got = CpuBackend().attend(query, kv, meta, 0.25, window=3)
        assert meta.scratch["torch_ref"]["decode"].kv_rows is not None   # the reference gathered
        want = naive_attention(query.float(), kv.float(), q_lens, ctx_lens, tables, 0.25, 3)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
        assert not torch.allclose(got.float(), naive_attention(query.float(), kv.float(), q_lens, ctx_lens,
                                                               tables, 0.25), atol=0.1)


@needs_cc
def test_decode_of_a_long_context_with_a_strided_query():
    """32 sequences, up to 700 keys; the query a column slice of a fused qkv, as the model passes it."""
    hq, hkv, d, bs = 9, 3, 64, 16
    specs = [(1, c) for c in range(50, 700, 20)]
    kv, _, key, value, q_lens, ctx_lens, tables, slots = random_case(11, hq, hkv, specs, bs=bs, d=d, num_blocks=1500)
    qkv = torch.randn(len(specs), hq + 2 * hkv, d)
    query = qkv[:, :hq]                                    # [S, Hq, D], not contiguous
    meta = make_meta(q_lens, ctx_lens, tables)
    meta.slot_mapping = slots
    got = CpuBackend().attend(query, kv, meta, 0.125)
    want = TorchBackend().attend(query, kv, make_meta(q_lens, ctx_lens, tables), 0.125)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@needs_cc
def test_other_dtypes_and_oversized_groups_take_the_reference_path():
    kv, query, key, value, q_lens, ctx_lens, tables, slots = random_case(3, 4, 2, CASES["decode"])
    kv16, q16 = kv.to(torch.bfloat16), query.to(torch.bfloat16)
    meta = make_meta(q_lens, ctx_lens, tables)
    got = CpuBackend().attend(q16, kv16, meta, 0.25)
    assert meta.scratch["torch_ref"]["decode"].kv_rows is not None       # the reference gathered
    assert torch.equal(got, TorchBackend().attend(q16, kv16, make_meta(q_lens, ctx_lens, tables), 0.25))
    kernel = load_kernels()
    wide = torch.zeros(2, 4, 1, 4, 16)                       # 1 KV head for 32 query heads: G = 32
    assert kernel.supports(kv, 4) and not kernel.supports(wide, kernel.max_group * 2)


@needs_cc
def test_kernel_is_built_once_per_source_and_reused(tmp_path):
    first = build_library(cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert build_library(cache_dir=tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]          # no temporary left behind
    symbols = subprocess.run(["nm", str(first)], capture_output=True, text=True).stdout
    assert "set_fast_math" not in symbols       # -ffast-math at link time would flush denormals process-wide


def test_no_compiler_or_a_bad_source_falls_back_to_the_reference(tmp_path, monkeypatch):
    import services.executor.attention.cpu_kernels as cpu_mod

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / cpu_mod.SOURCE).write_text("this is not C\n")
    if shutil.which("cc") or shutil.which("gcc"):
        with pytest.raises(CpuKernelUnavailable, match="failed to build"):
            build_library(kernel_dir=tmp_path / "src", cache_dir=tmp_path / "cache")
        assert not list((tmp_path / "cache").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(CpuKernelUnavailable, match="cannot build in"):
        build_library(cache_dir=tmp_path / "file" / "cache")                # not a directory
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(cpu_mod, "_kernels", None)
    with pytest.raises(CpuKernelUnavailable, match="could not run"):
        build_library(cache_dir=tmp_path / "cache2")
    with pytest.warns(UserWarning, match="CPU attention kernel unavailable"):
        backend = get_backend("auto", "cpu")
    assert type(backend) is TorchBackend


@needs_cc
@pytest.mark.parametrize("T, D", [(1, 576), (32, 576), (300, 2048), (5, 64)])
def test_add_rms_norm_matches_torch(T, D):
    g = torch.Generator().manual_seed(T)
    x, residual, weight = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), torch.rand(D, generator=g)
    want_sum = residual + x
    want = torch.nn.functional.rms_norm(want_sum, (D,), weight, eps=1e-5)
    out, new_residual = load_kernels().add_rms_norm(x, residual.clone(), weight, 1e-5)
    torch.testing.assert_close(new_residual, want_sum, atol=0, rtol=0)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@needs_cc
def test_the_model_fuses_every_residual_norm_where_the_backend_provides_the_kernel():
    from services.executor.worker import Worker
    from shared.config import CacheConfig, EngineConfig
    from shared.messages import NewSeq, SamplingParams, StepPlan

    class Counting(CpuBackend):
        calls = 0

        def add_rms_norm(self, *args):
            self.calls += 1
            return super().add_rms_norm(*args)

    assert isinstance(CpuBackend(), NormKernel) and not isinstance(TorchBackend(), NormKernel)
    tokens = {}
    for backend in (TorchBackend(), Counting()):
        cfg = EngineConfig(model="random:tiny", device="cpu", dtype="float32", attention_backend="torch",
                           cache=CacheConfig(block_size=4, num_blocks=8, num_host_blocks=0)).validate()
        w = Worker(cfg)
        w.backend = backend
        r = w.execute(StepPlan(step_id=0, new=[NewSeq(1, [5, 6, 7, 8, 9], [], [0, 1], 0, 5,
                                                      SamplingParams(temperature=0.0))]))
        tokens[backend.name] = r.token_ids
    assert backend.calls == 2 * w.model_config.num_layers     # every norm but the first layer's input norm
    assert tokens["cpu"] == tokens["torch"]


def test_kernel_dir_is_the_env_then_the_repository_then_the_wheel_copy(tmp_path, monkeypatch):
    from services.executor.attention import KERNEL_DIR, find_kernel_dir

    assert (KERNEL_DIR / "cpu_kernels.c").is_file() and (KERNEL_DIR / "paged_attention.cu").is_file()
    installed = tmp_path / "prefix" / "share" / "pagedserve" / "kernels"
    installed.mkdir(parents=True)
    monkeypatch.delenv("PAGEDSERVE_KERNEL_DIR", raising=False)
    assert find_kernel_dir(KERNEL_DIR.parent, str(tmp_path / "prefix")) == KERNEL_DIR
    assert find_kernel_dir(tmp_path / "no-repo", str(tmp_path / "prefix")) == installed
    monkeypatch.setenv("PAGEDSERVE_KERNEL_DIR", str(tmp_path / "mine"))
    assert find_kernel_dir(KERNEL_DIR.parent, str(tmp_path / "prefix")) == tmp_path / "mine"
