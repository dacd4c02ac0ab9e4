"""GGUF checkpoints converted once: the HF config and dequantized HF-named tensors, kept as safetensors.

transformers' GGUF reader takes about 30 s for the bundled 135M model on a 2-core machine (it parses
the 49k-entry vocabulary twice and rebuilds its tensor-name map for each tensor), which every
`pagedserve serve` start paid. The converted copy loads in about a second.

* Key: the file's resolved path, size and modification time, and the converter's versions
  (transformers, gguf, ``FORMAT``). Any change converts again; an entry that cannot be read is
  converted again and replaced.
* Tensors are stored as the reader returns them (before any dtype cast), so a hit followed by
  ``.to(dtype)`` gives what the reader gives with ``torch_dtype=dtype``.
* An entry is written in a temporary folder beside it and renamed into place, so loaders running at
  once (tensor-parallel ranks, data-parallel engines) never read half an entry.
* Where: ``$PAGEDSERVE_CACHE_DIR`` (default ``~/.cache/pagedserve``), as for the CPU kernels.
  ``PAGEDSERVE_GGUF_CACHE=0`` turns it off (every load converts).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from torch import Tensor

log = logging.getLogger("pagedserve.executor")

FORMAT = 1      # bump when what is stored changes
_CONFIG, _TENSORS = "config.json", "model.safetensors"


def cache_root() -> Path:
    return Path(os.environ.get("PAGEDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pagedserve")


def enabled() -> bool:
    return os.environ.get("PAGEDSERVE_GGUF_CACHE", "1") != "0"


def entry_key(gguf_path: str) -> str:
    import gguf
    import transformers
    st = os.stat(gguf_path)
    ident = [os.path.realpath(gguf_path), st.st_size, st.st_mtime_ns, transformers.__version__,
             getattr(gguf, "__version__", None) or _dist_version("gguf"), FORMAT]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def cached_config(gguf_path: str, root: Path | None = None):
    """The HF config of ``gguf_path``'s cache entry, or None (no entry, or the cache is off)."""
    entry = (root or cache_root()) / f"gguf-{entry_key(gguf_path)}"
    if not enabled() or not (entry / _CONFIG).is_file():
        return None
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(entry), local_files_only=True)


def load_or_convert(gguf_path: str, convert: Callable[[], tuple[object, dict[str, Tensor]]],
                    root: Path | None = None):
    """(HF config, state dict) from the cache entry of ``gguf_path``, else from ``convert()``, whose
    result is then stored. A cache that cannot be written is logged and skipped."""
    if not enabled():
        return convert()
    entry = (root or cache_root()) / f"gguf-{entry_key(gguf_path)}"
    if (entry / _TENSORS).is_file():
        try:
            hf_config, state = _read(entry)
            hf_config._name_or_path = os.path.dirname(gguf_path)    # as the reader names it, not the entry
            return hf_config, state
        except Exception as e:    # noqa: BLE001 - a damaged entry is converted again
            log.warning("converted-GGUF cache entry %s unreadable (%s): converting again", entry, e)
    hf_config, state = convert()
    try:
        _write(entry, hf_config, state)
    except OSError as e:
        log.warning("cannot cache the converted GGUF in %s: %s", entry.parent, e)
    return hf_config, state


def _read(entry: Path):
    from safetensors.torch import load_file
    from transformers import AutoConfig
    hf_config = AutoConfig.from_pretrained(str(entry), local_files_only=True)
    return hf_config, load_file(str(entry / _TENSORS))


def _write(entry: Path, hf_config, state: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".gguf-tmp-"))
    try:
        hf_config.to_json_file(str(tmp / _CONFIG), use_diff=False)
        # safetensors refuses tensors that share storage: store each as its own contiguous copy
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp / _TENSORS))
        if entry.exists():                     # a damaged entry (or another loader's): replace it
            shutil.rmtree(entry, ignore_errors=True)
        os.rename(tmp, entry)
    except OSError:
        if entry.is_dir() and (entry / _TENSORS).is_file():
            return                             # another loader renamed its copy first
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
