"""Where the kernel sources live (``kernels/``): the CUDA .cu files and the CPU .c file."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def find_kernel_dir(repo: Path = Path(__file__).resolve().parents[3], prefix: str = sys.prefix) -> Path:
    """kernels/ (the CUDA .cu files and the CPU .c file): $PAGEDSERVE_KERNEL_DIR, else the
    repository's (source checkout, editable install, Docker), else the copy a wheel installs."""
    if os.environ.get("PAGEDSERVE_KERNEL_DIR"):
        return Path(os.environ["PAGEDSERVE_KERNEL_DIR"])
    installed = Path(prefix) / "share" / "pagedserve" / "kernels"
    return repo / "kernels" if (repo / "kernels").is_dir() or not installed.is_dir() else installed


KERNEL_DIR = find_kernel_dir()
