"""Load the served model's tokenizer without importing torch.

`transformers.AutoTokenizer` (and its GGUF reader) import torch, which the gateway and the scheduler
(structured outputs) must not load.
For a GGUF file we read the tokenizer metadata with the `gguf` package (numpy only), then build the
`tokenizers` backend with transformers' own GGUF converter and wrap it in `TokenizersBackend`
(the fast tokenizer class, torch-free): same vocabulary, merges, special tokens and chat template
as `AutoTokenizer.from_pretrained(dir, gguf_file=...)`. An HF folder loads its `tokenizer.json`.
"""
from __future__ import annotations

import mmap
import os
import struct

from shared.model_path import ModelSource, resolve_model

# tokenizer.ggml.* metadata -> converter keys (transformers' GGUF_TOKENIZER_MAPPING)
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}
_CONFIG_KEYS = {"chat_template": "chat_template", "ggml.add_bos_token": "add_bos_token",
                "ggml.add_eos_token": "add_eos_token"}
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                   "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _gguf_metadata(path: str) -> dict:
    """The key/value metadata of a GGUF file (stops before the tensor infos; ~50 ms for a
    49k-token vocabulary, where gguf.GGUFReader takes seconds)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, _, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        pos, meta = 24, {}

        def string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n

        def value(kind: int, pos: int):
            if kind == _STRING:
                return string(pos)
            if kind == _ARRAY:
                elem, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if elem in _SCALARS:
                    fmt = f"<{count}{_SCALARS[elem]}"
                    return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
                out = []
                for _ in range(count):
                    item, pos = value(elem, pos)
                    out.append(item)
                return out, pos
            fmt = "<" + _SCALARS[kind]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)

        for _ in range(kv_count):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = value(kind, pos + 4)
        return meta


def _from_gguf(path: str):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    meta = _gguf_metadata(path)
    tok_dict = {v: meta[f"tokenizer.{k}"] for k, v in _TOKENIZER_KEYS.items() if f"tokenizer.{k}" in meta}
    config = {v: meta[f"tokenizer.{k}"] for k, v in _CONFIG_KEYS.items() if f"tokenizer.{k}" in meta}
    if tok_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tok_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
    return TokenizersBackend(tokenizer_object=backend, **config, **extra)


def load_tokenizer(model: str | ModelSource = ""):
    """The tokenizer of ``model`` ('' = bundled default, a .gguf file, an HF folder).

    ``random:<preset>`` models have no tokenizer of their own: they use the default model's."""
    src = model if isinstance(model, ModelSource) else resolve_model(model)
    if src.random_preset is not None:
        src = resolve_model("")
    if src.gguf_file:
        return _from_gguf(os.path.join(src.directory, src.gguf_file))
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend.from_pretrained(src.directory, local_files_only=True)
