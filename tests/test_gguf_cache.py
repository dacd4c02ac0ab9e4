"""The converted-GGUF cache (services/executor/gguf_cache.py): a hit gives exactly what the converter
gave, anything that changes the file or damages the entry converts again, and it can be turned off."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig

from services.executor import gguf_cache


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF not really")
    return path


class Converter:
    """Stands in for transformers' reader (which names the config by the GGUF's folder): counts its calls."""

    def __init__(self, gguf_path):
        self.calls = 0
        emb = torch.randn(16, 8)
        self.state = {"embed_tokens.weight": emb, "lm_head.weight": emb,          # shared storage
                      "layers.0.self_attn.q_proj.weight": torch.randn(8, 8).to(torch.float16),
                      "norm.weight": torch.randn(8).to(torch.bfloat16)}
        self.config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                  name_or_path=str(gguf_path.parent))

    def __call__(self):
        self.calls += 1
        return self.config, self.state


def _same(result, conv: Converter):
    config, state = result
    assert state.keys() == conv.state.keys()
    for k, v in conv.state.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert type(config) is type(conv.config)
    assert config.to_dict() == conv.config.to_dict()


def test_a_hit_returns_what_the_converter_gave_without_converting(gguf_file, tmp_path):
    conv = Converter(gguf_file)
    first = gguf_cache.load_or_convert(str(gguf_file), conv, root=tmp_path / "cache")
    assert conv.calls == 1 and first[1] is conv.state
    second = gguf_cache.load_or_convert(str(gguf_file), conv, root=tmp_path / "cache")
    assert conv.calls == 1
    _same(second, conv)     # the config named by the GGUF's folder too, not by the entry
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("gguf-")   # no temporary folder left


def test_a_changed_file_converts_again(gguf_file, tmp_path):
    conv = Converter(gguf_file)
    gguf_cache.load_or_convert(str(gguf_file), conv, root=tmp_path / "cache")
    gguf_file.write_bytes(b"GGUF another model, longer")
    gguf_cache.load_or_convert(str(gguf_file), conv, root=tmp_path / "cache")
    assert conv.calls == 2
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))      # same size, newer
    gguf_cache.load_or_convert(str(gguf_file), conv, root=tmp_path / "cache")
    assert conv.calls == 3


def test_a_damaged_entry_is_converted_again_and_replaced(gguf_file, tmp_path):
    conv = Converter(gguf_file)
    root = tmp_path / "cache"
    gguf_cache.load_or_convert(str(gguf_file), conv, root=root)
    (tensors,) = root.glob("gguf-*/model.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:40])
    _same(gguf_cache.load_or_convert(str(gguf_file), conv, root=root), conv)
    assert conv.calls == 2
    _same(gguf_cache.load_or_convert(str(gguf_file), conv, root=root), conv)   # repaired
    assert conv.calls == 2


def test_off_converts_every_time_and_writes_nothing(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_GGUF_CACHE", "0")
    conv = Converter(gguf_file)
    for _ in range(2):
        gguf_cache.load_or_convert(str(gguf_file), conv, root=tmp_path / "cache")
    assert conv.calls == 2 and not (tmp_path / "cache").exists()


def test_an_unwritable_cache_still_loads(gguf_file, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would be")
    conv = Converter(gguf_file)
    result = gguf_cache.load_or_convert(str(gguf_file), conv, root=blocker)
    assert result[1] is conv.state
    assert "cannot cache the converted GGUF" in caplog.text


def test_the_root_follows_pagedserve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    assert gguf_cache.cache_root() == tmp_path


def test_the_cached_config_is_read_without_the_tensors(gguf_file, tmp_path, monkeypatch):
    """What tensor parallelism checks before starting its ranks: the config alone, from the entry."""
    root = tmp_path / "cache"
    assert gguf_cache.cached_config(str(gguf_file), root=root) is None          # not converted yet
    conv = Converter(gguf_file)
    gguf_cache.load_or_convert(str(gguf_file), conv, root=root)
    config = gguf_cache.cached_config(str(gguf_file), root=root)
    assert config.num_attention_heads == 2 and config.vocab_size == 16
    monkeypatch.setenv("PAGEDSERVE_GGUF_CACHE", "0")
    assert gguf_cache.cached_config(str(gguf_file), root=root) is None


def test_a_random_preset_and_a_folder_give_their_config_without_weights(tmp_path):
    from services.executor.weights import load_model_config
    from shared.model_path import resolve_model
    from tests import model_families as mf

    assert load_model_config(resolve_model("random:tiny")).num_heads == 4
    folder = mf.make_checkpoint("qwen3", tmp_path / "qwen3")
    config = load_model_config(resolve_model(folder))
    assert (config.architecture, config.head_dim, config.qk_norm) == ("Qwen3ForCausalLM", 32, True)
