"""``get_backend``: the attention backend by name (``--attention-backend``), with fallbacks."""
from __future__ import annotations

import warnings

import torch

from services.executor.attention.base import AttentionBackend
from shared.config import ATTENTION_BACKENDS


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """'torch' -> reference; 'cpu' -> reference + C decode kernel; 'cuda' -> CuPy kernels;
    'auto' -> 'cuda' on a CUDA device, else 'cpu'. A kernel backend that cannot load falls back
    to the reference with a warning."""
    device = torch.device(device)
    if name == "auto":
        name = "cuda" if device.type == "cuda" else "cpu"
    if name in ("cuda", "cpu") and device.type != name:
        warnings.warn(f"attention backend {name!r} needs a {name.upper()} device; using the torch reference")
        name = "torch"
    if name == "cuda":
        try:
            from services.executor.attention.cuda import CudaBackend
            return CudaBackend(device)
        except Exception as e:  # noqa: BLE001 - any import/init failure falls back
            warnings.warn(f"CUDA attention backend unavailable ({type(e).__name__}: {e}); "
                          "using the torch reference")
        name = "torch"
    if name == "cpu":
        from services.executor.attention.cpu import CpuBackend
        from services.executor.attention.cpu_kernels import CpuKernelUnavailable
        try:
            return CpuBackend()
        except CpuKernelUnavailable as e:
            warnings.warn(f"CPU attention kernel unavailable ({e}); using the torch reference")
        name = "torch"
    if name == "torch":
        from services.executor.attention.torch_ref import TorchBackend
        return TorchBackend()
    raise ValueError(f"unknown attention backend {name!r} (choose one of {', '.join(ATTENTION_BACKENDS)})")
