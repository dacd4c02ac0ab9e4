"""Session fixtures shared by the test files: the default model is read from disk once.

- ``default_model_source``: the bundled SmolLM2-135M-Instruct GGUF (``ModelSource``)
- ``hf_checkpoint``: (transformers config, HF-named float32 state dict), dequantized once
- ``hf_model``: transformers ``LlamaForCausalLM`` (float32, CPU, eval) on those weights
- ``hf_tokenizer``: its tokenizer
- ``default_loaded_model``: our ``LoadedModel`` on the same weights (tensors shared)
- ``default_worker_factory(num_blocks=512, block_size=16, num_host_blocks=64, backend="torch", **engine_kw)``:
  a fresh ``Worker`` (own KV cache and state) around the loaded model, cheap to create; it fails
  when the worker did not get the attention backend asked for (no silent fallback to the reference)
- ``default_server``: `pagedserve serve` on the default model, (base URL, model name), started once
  for the HTTP end-to-end modules that only send it requests (test_structured_serve, test_beam_serve)
- ``attention_backend``: parametrized over every backend this machine has (``BACKEND_PARAMS``:
  torch, cpu, and cuda where CUDA is present); ``backend_worker_factory``: the factory above bound
  to it. The HF-exactness tests use these, so the default CPU path (auto -> cpu) is compared too.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import shutil

import pytest
import torch
from hypothesis import Phase, settings

# `make mutation` runs the suite once per mutant and only needs pass or fail: no shrinking of a
# failing example, no example database shared between mutants.
settings.register_profile("mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None)
if os.environ.get("PAGEDSERVE_HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["PAGEDSERVE_HYPOTHESIS_PROFILE"])

# Every attention backend the HF-exactness tests run on. `cpu` is the C kernel backend (the default
# on a CPU: `auto` -> `cpu`), built with the system C compiler at first use.
BACKEND_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
        not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
        reason="no C compiler for the CPU kernels")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


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
def default_server(tmp_path_factory, default_model_source):
    """`pagedserve serve` on the default model (three processes), started once for the HTTP
    end-to-end modules that only send it requests: (base URL, served model name)."""
    from tests.serve_harness import serving
    with serving(["--num-blocks", "256", "--max-model-len", "1024"], tmp_path_factory.mktemp("serve")) as base:
        yield base, default_model_source.name


@pytest.fixture(scope="session")
def default_loaded_model(default_model_source, hf_checkpoint):
    from services.executor.model import ModelConfig
    from services.executor.weights import LoadedModel, build_model
    hf_config, state = hf_checkpoint
    cfg = ModelConfig.from_hf(hf_config)
    model = build_model(cfg, state, dtype=torch.float32, max_seq_len=2048)
    return LoadedModel(default_model_source.name, cfg, model, list(cfg.eos_token_ids))


@pytest.fixture(scope="session")
def default_worker_factory(default_loaded_model, hf_checkpoint):
    from services.executor.model import ModelConfig
    from services.executor.weights import LoadedModel, build_model
    from services.executor.worker import Worker
    from shared.config import CacheConfig, EngineConfig

    loaded = {"cpu": default_loaded_model}

    def on(device: str):
        """The session model on ``device`` (a second copy built once for cuda)."""
        if device not in loaded:
            hf_config, state = hf_checkpoint
            cfg = ModelConfig.from_hf(hf_config)
            model = build_model(cfg, state, dtype=torch.float32, device=device, max_seq_len=2048)
            loaded[device] = LoadedModel(default_loaded_model.name, cfg, model, list(cfg.eos_token_ids))
        return loaded[device]

    def make(num_blocks: int = 512, block_size: int = 16, num_host_blocks: int = 64, backend: str = "torch",
             **engine_kw):
        device = "cuda" if backend == "cuda" else "cpu"
        cfg = EngineConfig(device=device, dtype="float32", attention_backend=backend,
                           cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                             num_host_blocks=num_host_blocks), **engine_kw)
        worker = Worker.from_loaded(on(device), cfg.validate())
        assert worker.backend.name == backend, f"asked for the {backend} backend, got {worker.backend.name}"
        return worker

    return make


@pytest.fixture(params=BACKEND_PARAMS)
def attention_backend(request) -> str:
    return request.param


@pytest.fixture
def backend_worker_factory(default_worker_factory, attention_backend):
    """``default_worker_factory`` on this test's attention backend."""
    def make(**kw):
        return default_worker_factory(backend=attention_backend, **kw)
    return make


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (soak variants); PAGEDSERVE_RUN_SLOW=1 does the same")


# ---------------------------------------------------------------------------------- test tiers
# `unit`: no sockets, no subprocesses, no model load (`make test-fast`); `integration`: the rest.
# A test is integration when it asks for a model fixture below, is marked so itself, or lives in
# one of these modules; every other test is unit, and a unit test that opens a socket or starts a
# process fails (``_unit_tier_guard``), so a wrong tier shows up in `make test`, not in a slow loop.
MODEL_FIXTURES = frozenset({"default_model_source", "hf_checkpoint", "hf_model", "hf_tokenizer",
                            "default_loaded_model", "default_worker_factory", "backend_worker_factory",
                            "default_server"})
INTEGRATION_MODULES = frozenset({
    "test_attention_cpu",        # builds the C kernels with cc
    "test_bench", "test_cli_and_compose", "test_config_e2e", "test_fuzz_openapi", "test_gateway", "test_kernels_compile",
    "test_launcher", "test_limits", "test_no_torch_import", "test_scheduler_service", "test_security",
    "test_serve_e2e", "test_soak", "test_worker_errors", "test_fuzz_wire", "test_engine_errors", "test_serve_oracle",
    "test_model_families",       # `pagedserve generate` / `serve` subprocesses on built checkpoints
    "test_structured_serve",     # `pagedserve serve` on the default model
    "test_tools_gateway",        # the gateway over a socket with the scripted scheduler
    "test_beam_gateway",         # the gateway over HTTP on the scripted scheduler
    "test_beam_serve",           # `pagedserve serve` on the default model
    "test_kernels_host",         # builds the CUDA kernels for the host and runs them in a subprocess
    "test_data_parallel",        # `pagedserve serve --data-parallel-size 2`
    "test_tensor_parallel",      # `pagedserve serve --tensor-parallel-size 2`
})


def _tier(item) -> str:
    if item.get_closest_marker("integration") or item.get_closest_marker("slow"):
        return "integration"
    if item.module.__name__.rpartition(".")[2] in INTEGRATION_MODULES:
        return "integration"
    return "integration" if MODEL_FIXTURES & set(item.fixturenames) else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(_tier(item))
    if config.getoption("--run-slow") or os.environ.get("PAGEDSERVE_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or PAGEDSERVE_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _unit_tier_guard(request, monkeypatch):
    """In a unit test, opening a socket (ZeroMQ too) or starting a process is an error."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    import socket
    import subprocess

    def refuse(what):
        def fail(*_args, **_kwargs):
            raise RuntimeError(f"{what} in a unit-tier test: mark it integration (tests/conftest.py)")
        return fail

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("a subprocess"))
    for name in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse("a socket"))
    try:
        import zmq
        monkeypatch.setattr(zmq.Context, "socket", refuse("a ZeroMQ socket"))
    except ImportError:
        pass
    yield
