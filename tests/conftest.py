"""Session fixtures shared by the test files: the default model is read from disk once.

- ``default_model_source``: the bundled SmolLM2-135M-Instruct GGUF (``ModelSource``)
- ``hf_checkpoint``: (transformers config, HF-named float32 state dict), dequantized once
- ``hf_model``: transformers ``LlamaForCausalLM`` (float32, CPU, eval) on those weights
- ``hf_tokenizer``: its tokenizer
- ``default_loaded_model``: our ``LoadedModel`` on the same weights (tensors shared)
- ``default_worker_factory(num_blocks=512, block_size=16, num_host_blocks=64, **engine_kw)``:
  a fresh ``Worker`` (own KV cache and state) around the loaded model, cheap to create
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_source():
    from shared.model_path import resolve_model
    try:
        return resolve_model("")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_checkpoint(default_model_source):
    from services.executor.weights import load_hf_checkpoint
    return load_hf_checkpoint(default_model_source, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_model(hf_checkpoint):
    from services.executor.weights import build_hf_reference
    return build_hf_reference(*hf_checkpoint)


@pytest.fixture(scope="session")
def hf_tokenizer(default_model_source):
    from transformers import AutoTokenizer
    src = default_model_source
    return AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)


@pytest.fixture(scope="session")
def default_loaded_model(default_model_source, hf_checkpoint):
    from services.executor.model import ModelConfig
    from services.executor.weights import LoadedModel, build_model
    hf_config, state = hf_checkpoint
    cfg = ModelConfig.from_hf(hf_config)
    model = build_model(cfg, state, dtype=torch.float32, max_seq_len=2048)
    return LoadedModel(default_model_source.name, cfg, model, list(cfg.eos_token_ids))


@pytest.fixture(scope="session")
def default_worker_factory(default_loaded_model):
    from services.executor.worker import Worker
    from shared.config import CacheConfig, EngineConfig

    def make(num_blocks: int = 512, block_size: int = 16, num_host_blocks: int = 64, **engine_kw):
        cfg = EngineConfig(device="cpu", dtype="float32", attention_backend="torch",
                           cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                             num_host_blocks=num_host_blocks), **engine_kw)
        return Worker.from_loaded(default_loaded_model, cfg.validate())

    return make


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (soak variants); PAGEDSERVE_RUN_SLOW=1 does the same")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("PAGEDSERVE_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or PAGEDSERVE_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
