"""The executor's CPU kernels (``kernels/cpu_kernels.c``), compiled and loaded without torch's
extension machinery: paged decode attention (used by the ``cpu`` attention backend) and a fused
residual add + RMSNorm (used by the model). float32 only, the CPU default dtype.

The source is compiled once per machine with the system C compiler into ``$PAGEDSERVE_CACHE_DIR``
(default ``~/.cache/pagedserve``), under a name hashed from the source, the flags and the CPU
(``-march=native``), in about a second, and loaded with ctypes (calls release the GIL). Without a
compiler ``load_kernels`` raises ``CpuKernelUnavailable`` and callers keep their torch paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from services.executor.attention.kernel_dir import KERNEL_DIR

SOURCE = "cpu_kernels.c"
# Compile and link are two commands: linking a shared library with -ffast-math (gcc < 13) adds
# crtfastmath.o, whose constructor turns on flush-to-zero for the whole process, torch included.
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11")
LDFLAGS = ("-shared", "-fopenmp", "-lmvec", "-lm")


class CpuKernelUnavailable(RuntimeError):
    """No C compiler, or the library did not build or load."""


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags (a cache dir may be shared)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def build_library(kernel_dir: Path = KERNEL_DIR, cache_dir: Optional[Path] = None) -> Path:
    """Compile the kernels once per (source, flags, compiler, CPU); returns the shared library."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise CpuKernelUnavailable("no C compiler found (set CC, or install gcc)")
    source = (Path(kernel_dir) / SOURCE).read_text()
    key = hashlib.sha256("\0".join([source, cc, *CFLAGS, *LDFLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("PAGEDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pagedserve")
    lib = cache / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:      # build beside, then rename: concurrent
            _compile(cc, source, tmp, lib)                       # builders never load half a file
    except OSError as e:
        raise CpuKernelUnavailable(f"cannot build in {cache}: {e}") from e
    return lib


def _compile(cc: str, source: str, tmp: str, lib: Path) -> None:
    obj, so = os.path.join(tmp, "k.o"), os.path.join(tmp, "k.so")
    compile_, link = [cc, *CFLAGS, "-c", "-x", "c", "-", "-o", obj], [cc, obj, "-o", so, *LDFLAGS]
    for cmd, stdin in ((compile_, source), (link, None)):
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CpuKernelUnavailable(f"could not run {cc}: {e}") from e
        if proc.returncode != 0:
            raise CpuKernelUnavailable(f"{cc} failed to build {SOURCE}: {proc.stderr.strip()[-500:]}")
    os.replace(so, lib)


class CpuKernels:
    """The loaded library: paged decode attention and the fused residual add + RMSNorm (float32)."""

    def __init__(self, path: Path):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise CpuKernelUnavailable(f"could not load {path}: {e}") from e
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.pagedserve_decode_f32.argtypes = [ptr] * 6 + [i64] * 6 + [ctypes.c_float, i64, ctypes.c_int]
        lib.pagedserve_decode_f32.restype = ctypes.c_int
        lib.pagedserve_add_rms_norm_f32.argtypes = [ptr] * 4 + [i64] * 2 + [ctypes.c_float, ctypes.c_int]
        lib.pagedserve_add_rms_norm_f32.restype = None
        lib.pagedserve_cpu_limits.argtypes = [ctypes.POINTER(i64)] * 3
        limits = [i64(), i64(), i64()]
        lib.pagedserve_cpu_limits(*(ctypes.byref(x) for x in limits))
        self.max_group, self.max_block_size, self.max_head_dim = (x.value for x in limits)
        self._decode = lib.pagedserve_decode_f32
        self._add_rms_norm = lib.pagedserve_add_rms_norm_f32

    def supports(self, kv: Tensor, num_q_heads: int) -> bool:
        _, _, hkv, bs, d = kv.shape
        return (kv.dtype == torch.float32 and kv.device.type == "cpu" and kv.is_contiguous()
                and num_q_heads % hkv == 0 and num_q_heads // hkv <= self.max_group
                and bs <= self.max_block_size and d <= self.max_head_dim)

    def decode(self, q: Tensor, kv: Tensor, tables: Tensor, ctx: Tensor, scale: float, window: int = 0) -> Tensor:
        # q [S, Hq, D] float32; kv [2, N, Hkv, bs, D]; tables [S, nb] int32; ctx [S] int32 -> [S, Hq, D]
        # window > 0: row s sees keys ctx[s] - window .. ctx[s] - 1 only; 0: all ctx[s] keys
        q, tables, ctx = q.contiguous(), tables.contiguous(), ctx.contiguous()
        S, hq, d = q.shape
        _, _, hkv, bs, _ = kv.shape
        out = torch.empty_like(q)
        rc = self._decode(q.data_ptr(), kv[0].data_ptr(), kv[1].data_ptr(), tables.data_ptr(),
                          ctx.data_ptr(), out.data_ptr(), S, hq, hkv, d, bs, tables.shape[1],
                          scale, window, torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"shape outside the CPU kernel's limits: Hq {hq}, Hkv {hkv}, bs {bs}, D {d}, "
                             f"window {window}")
        return out

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """x, residual [T, D] float32 -> (rms_norm(residual + x) * weight, residual + x); the sum is
        written into ``residual`` (the caller's running residual stream, owned by the forward)."""
        x, weight = x.contiguous(), weight.contiguous()
        if not residual.is_contiguous():
            residual = residual.contiguous()
        out = torch.empty_like(residual)
        T, D = residual.shape
        self._add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), T, D,
                           eps, torch.get_num_threads())
        return out, residual


_kernels: Optional[CpuKernels] = None


def load_kernels() -> CpuKernels:
    """Build (first time on this machine) and load the kernels, once per process."""
    global _kernels
    if _kernels is None:
        _kernels = CpuKernels(build_library())
    return _kernels
