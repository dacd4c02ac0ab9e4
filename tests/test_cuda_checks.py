"""The CUDA backend's argument checks, run on CPU tensors (no GPU needed): what a kernel would
read wrongly is refused or copied before any launch."""
from __future__ import annotations

import pytest
import torch

from services.executor.attention.cuda import GRID_YZ_MAX, CudaBackend, plan_attention

NB, HKV, BS, D = 4, 2, 16, 64


def _misaligned(shape, dtype=torch.float16) -> torch.Tensor:
    """A contiguous tensor whose base is one element past a 16-byte boundary."""
    n = 1
    for s in shape:
        n *= s
    t = torch.zeros(n + 8, dtype=dtype)[1:1 + n].view(shape)
    assert t.is_contiguous() and t.data_ptr() % 16
    return t


def test_a_misaligned_kv_cache_is_refused():
    CudaBackend._check_cache(torch.zeros(2, NB, HKV, BS, D, dtype=torch.float16))
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        CudaBackend._check_cache(_misaligned((2, NB, HKV, BS, D)))


def test_a_contiguous_but_misaligned_key_is_copied_to_an_aligned_buffer():
    key = _misaligned((3, HKV, D))
    key.copy_(torch.randn(3, HKV, D))
    out = CudaBackend._vectorizable(key)
    assert out.data_ptr() % 16 == 0 and torch.equal(out, key)
    aligned = torch.randn(3, HKV, D).half()
    assert CudaBackend._vectorizable(aligned) is aligned            # no copy when it can be read
    strided = torch.randn(3, D, HKV).half().transpose(1, 2)         # last dim not contiguous
    assert CudaBackend._vec_ok(CudaBackend._vectorizable(strided))


def test_write_kv_inputs_are_checked_against_the_cache():
    kv = torch.zeros(2, NB, HKV, BS, D, dtype=torch.float16)
    k, v = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    key, value = CudaBackend._kv_inputs(kv, k, v, 3)
    assert key.dtype == value.dtype == torch.float16 and torch.equal(key, k.half())
    with pytest.raises(ValueError, match=r"key must be \[T, 2, 64\]"):
        CudaBackend._kv_inputs(kv, torch.randn(3, 4, D), v, 3)
    with pytest.raises(ValueError, match=r"value must be \[T, 2, 64\]"):
        CudaBackend._kv_inputs(kv, k, torch.randn(3, HKV, 128), 3)
    with pytest.raises(ValueError, match="key has 3 tokens, value 2, slot mapping 3"):
        CudaBackend._kv_inputs(kv, k, v[:2], 3)
    with pytest.raises(ValueError, match="slot mapping 4"):
        CudaBackend._kv_inputs(kv, k, v, 4)
    with pytest.raises(ValueError, match="floating tensor"):
        CudaBackend._kv_inputs(kv, k.long(), v, 3)


def test_force_split_respects_the_reduce_grid_limit():
    kw = dict(num_seqs=1, num_heads=8, num_kv_heads=2, max_seqlen_q=GRID_YZ_MAX + 1,
              max_context_len=GRID_YZ_MAX + 1, head_dim=D)
    with pytest.raises(ValueError, match="reduce kernel's grid.y"):
        plan_attention(num_tokens=GRID_YZ_MAX + 1, force_split=True, **kw)
    assert not plan_attention(num_tokens=GRID_YZ_MAX + 1, **kw).split        # the heuristic keeps single pass
    assert plan_attention(num_tokens=GRID_YZ_MAX, force_split=True, **kw).split
