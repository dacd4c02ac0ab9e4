"""The CUDA kernels (``kernels/*.cu``) compiled for the host and run through ``CudaBackend``.

No GPU has been at hand for this project, so the suite runs the real kernel text on the CPU:

* ``kernels/host/cuda_host.h`` gives the CUDA built-ins (threads of a CTA as fibers, barriers,
  warp shuffles with their checks, fp16 in C++); the kernel files are compiled unchanged, with the
  header forced in (``-include``) and UBSan's alignment check on, by the system C++ compiler.
  The one textual rewrite: ``extern __shared__ T name[];`` (dynamic shared memory) becomes a
  pointer to the CTA's dynamic buffer, since a host ``extern`` cannot be per-launch storage.
* Entry points are read from the preprocessed text; each gets a ``ps_call_<name>(void** args)``
  trampoline and a signature, and every launch checks each argument's numpy type against it.
* ``HostCudaBackend`` is ``CudaBackend`` with only ``_launch`` (and the device) replaced: its
  planning, buffers and argument marshalling are the ones the GPU runs. Fresh outputs
  (``_empty``) are filled with NaN so a value a kernel forgot to write shows.

It runs kernels in the calling process: a kernel bug can crash it, so tests run it in a
subprocess (tests/test_kernels_host.py). Not a performance path: one CTA at a time, one fiber at a
time.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from services.executor.attention.cuda import CudaBackend, kernel_source
from services.executor.attention.kernel_dir import KERNEL_DIR

SHIM = KERNEL_DIR / "host" / "cuda_host.h"
CXXFLAGS = ("-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-fno-strict-aliasing",
            "-fsanitize=alignment", "-fno-sanitize-recover=all", "-Wno-attributes")
MODES = {"in-order": 0, "reversed": 1, "shuffled": 2, "warp-at-a-time": 3}

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_ENTRY = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{')
_C_TYPES = {  # C parameter type -> (numpy type the backend passes, ctypes type)
    "int": (np.int32, ctypes.c_int32), "long long": (np.int64, ctypes.c_int64),
    "float": (np.float32, ctypes.c_float),
}
_PTR = (np.uint64, ctypes.c_uint64)


class HostKernelError(RuntimeError):
    """The host build failed, or a kernel broke a CUDA rule (barrier, shuffle, alignment)."""


def _cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise HostKernelError("no C++ compiler (set CXX, or install g++)")
    return cxx


def _run(cmd: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise HostKernelError(f"{' '.join(cmd[:2])} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _param_type(param: str) -> tuple[type, Any, str]:
    """'const F16::storage* __restrict q' -> (numpy type, ctypes type, C type text)."""
    p = " ".join(param.replace("__restrict", " ").split())
    ctype = p.rsplit(" ", 1)[0] if not p.endswith("*") else p
    if "*" in p:
        return (*_PTR, ctype.rsplit("*", 1)[0] + "*")
    base = ctype.replace("const ", "").strip()
    if base not in _C_TYPES:
        raise HostKernelError(f"entry parameter type {base!r} has no marshalling rule")
    return (*_C_TYPES[base], base)


def build(file: str, cache_dir: Path | None = None) -> tuple[Path, dict[str, list[tuple[str, type, Any]]]]:
    """Compile ``kernels/<file>`` for the host; returns the library and each entry's parameters."""
    cxx = _cxx()
    source = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(ps::dynamic_shared);", kernel_source(file))
    shim = SHIM.read_text()
    expanded = _run([cxx, "-std=c++17", "-E", "-P", "-x", "c++", "-include", str(SHIM), "-"], source)
    entries: dict[str, list[tuple[str, type, Any]]] = {}
    trampolines = []
    for name, params in _ENTRY.findall(expanded):
        parts = [p.strip() for p in params.split(",") if p.strip()]
        sig = []
        for p in parts:
            np_t, c_t, text = _param_type(p)
            sig.append((p.split()[-1].lstrip("*"), np_t, c_t, text))
        entries[name] = [(n, np_t, c_t) for n, np_t, c_t, _ in sig]
        casts = ", ".join(f"*({text}*)a[{i}]" for i, (_, _, _, text) in enumerate(sig))
        trampolines.append(f'extern "C" void ps_call_{name}(void** a) {{ {name}({casts}); }}')
    if not entries:
        raise HostKernelError(f"no extern \"C\" entry points found in {file}")
    full = source + "\n// ---- host trampolines\n" + "\n".join(trampolines) + "\n"
    key = hashlib.sha256("\0".join([full, shim, cxx, *CXXFLAGS]).encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("PAGEDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pagedserve")
    lib = cache / f"host-{Path(file).stem}-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:       # build beside, then rename
            src, so = os.path.join(tmp, "k.cpp"), os.path.join(tmp, "k.so")
            Path(src).write_text(full)
            _run([cxx, *CXXFLAGS, "-include", str(SHIM), src, "-o", so])
            os.replace(so, lib)
    return lib, entries


class HostLauncher:
    """Launches host-compiled kernels: ``launch(file, name, grid, block, args, shared_mem)`` with
    the same arguments ``CudaBackend._launch`` gives CuPy."""

    def __init__(self, mode: str = "in-order", seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        self.mode, self.seed = MODES[mode], seed
        self._libs: dict[str, tuple[ctypes.CDLL, dict]] = {}
        self.launches = 0

    def _lib(self, file: str):
        if file not in self._libs:
            path, entries = build(file)
            lib = ctypes.CDLL(str(path))
            lib.ps_launch.restype = ctypes.c_int
            lib.ps_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                      ctypes.c_uint, ctypes.c_long, ctypes.c_int, ctypes.c_uint,
                                      ctypes.c_char_p, ctypes.c_int]
            self._libs[file] = (lib, entries)
        return self._libs[file]

    def launch(self, file: str, name: str, grid, block, args, shared_mem: int = 0) -> None:
        lib, entries = self._lib(file)
        if name not in entries:
            raise HostKernelError(f"{file} has no entry {name!r}")
        sig = entries[name]
        if len(args) != len(sig):
            raise TypeError(f"{name} takes {len(sig)} arguments, got {len(args)}")
        values = []
        for (pname, np_t, c_t), a in zip(sig, args):
            if type(a) is not np_t:
                raise TypeError(f"{name}: argument {pname!r} must be {np_t.__name__}, got {type(a).__name__}")
            values.append(c_t(int(a) if np_t is not np.float32 else float(a)))
        argv = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        err = ctypes.create_string_buffer(1024)
        call = ctypes.cast(getattr(lib, f"ps_call_{name}"), ctypes.c_void_p)
        rc = lib.ps_launch(call, argv, *grid, int(block), int(shared_mem), self.mode,
                           self.seed + self.launches, err, len(err))
        self.launches += 1
        if rc:
            raise HostKernelError(f"{name}: {err.value.decode()}")


class HostCudaBackend(CudaBackend):
    """``CudaBackend`` on CPU tensors with the kernels run by a ``HostLauncher``."""

    def __init__(self, launcher: HostLauncher | None = None, num_sms: int = 132):   # noqa: D107 - no CUDA init
        self.device = torch.device("cpu")
        self.cp = None
        self.num_sms = num_sms
        self._layer_ptrs: dict[tuple[int, ...], Tensor] = {}
        self.launcher = launcher or HostLauncher()

    def _launch(self, file: str, name: str, grid, block, args, shared_mem: int = 0) -> None:
        self.launcher.launch(file, name, grid, block, args, shared_mem)

    def _empty(self, shape, dtype) -> Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=self.device)
