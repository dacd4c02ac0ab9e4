"""Attention backends behind one interface: ``base`` (the interface), ``registry`` (``get_backend``),
``torch_ref`` (the reference), ``cpu`` (+ ``cpu_kernels``, its C kernels), ``cuda`` (CuPy kernels),
``kernel_dir`` (where the kernel sources are). Submodules never import this package's ``__init__``.
"""
from services.executor.attention.base import AttentionBackend, AttentionMetadata, NormKernel
from services.executor.attention.kernel_dir import KERNEL_DIR, find_kernel_dir
from services.executor.attention.registry import get_backend

__all__ = ["AttentionMetadata", "AttentionBackend", "NormKernel", "KERNEL_DIR", "find_kernel_dir", "get_backend"]
