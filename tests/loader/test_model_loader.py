"""Loading: model sources, and a clear error for every broken checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from twinfer import LLM, SamplingParams
from twinfer.config import EngineConfig
from twinfer.loader.resolve import resolve_model


@pytest.fixture()
def checkpoint_copy(tiny_checkpoints, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_checkpoints("llama-tiny"), dst)
    return dst


def test_missing_model_path() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/nonexistent/model-dir")


def test_directory_without_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))


def test_unknown_architecture_lists_the_supported_ones(checkpoint_copy) -> None:
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*LlamaForCausalLM"):
        LLM(str(checkpoint_copy))


def test_remote_code_is_refused(checkpoint_copy) -> None:
    with pytest.raises(ValueError, match="never runs code"):
        LLM(str(checkpoint_copy), trust_remote_code=True)
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config.update(model_type="fancy_remote", auto_map={"AutoModelForCausalLM": "fancy.Model"})
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust-remote-code"):
        LLM(str(checkpoint_copy))


def test_missing_weights(checkpoint_copy) -> None:
    for f in checkpoint_copy.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(checkpoint_copy))


def test_corrupt_safetensors(checkpoint_copy) -> None:
    shard = next(checkpoint_copy.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        LLM(str(checkpoint_copy))


def test_corrupt_gguf(tmp_path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="not a valid GGUF"):
        LLM(str(bad))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a GGUF"):
        LLM(str(other))


def test_unknown_hub_id_names_what_is_missing(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="not-a-real-org/not-a-model.*cache"):
        resolve_model("not-a-real-org/not-a-model")


def test_hub_id_resolves_from_the_local_cache(tiny_checkpoints, monkeypatch, tmp_path) -> None:
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_checkpoints("llama-tiny"), snapshot)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("acme/tiny").path == snapshot


def test_unknown_engine_argument() -> None:
    with pytest.raises(ValueError, match="unknown engine argument.*max_num_seq"):
        EngineConfig.from_kwargs(max_num_seq=4)


def test_generation_config_eos_is_honoured(tiny_checkpoints) -> None:
    llm = LLM(str(tiny_checkpoints("llama-tiny")), dtype="float32")
    eos = llm.engine.info.eos_token_ids
    assert eos, "generation_config.json's eos_token_id must be read"
    out = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[]), use_tqdm=False
    )[0].outputs[0]
    assert all(t not in eos for t in out.token_ids[:-1])


def test_sliding_window_beyond_the_window_is_refused(checkpoint_copy) -> None:
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config.update(sliding_window=64, use_sliding_window=True, max_window_layers=0)
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sliding-window attention.*--max-model-len 64"):
        LLM(str(checkpoint_copy), max_model_len=128)
    llm = LLM(str(checkpoint_copy), max_model_len=64, dtype="float32")
    assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].text


def test_generation_config_top_k_zero_means_off(checkpoint_copy) -> None:
    """transformers and llama.cpp write top_k 0 for "off"; requests must not all fail on it."""
    gen = json.loads((checkpoint_copy / "generation_config.json").read_text())
    gen.update(top_k=0, temperature=0.7)
    (checkpoint_copy / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(checkpoint_copy), max_model_len=64, dtype="float32")
    params = llm.get_default_sampling_params()
    assert (params.top_k, params.temperature) == (-1, 0.7)
    assert llm.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids


def test_loading_reports_progress_per_shard(tmp_path, caplog) -> None:
    """A large checkpoint loads for minutes: each shard logs how far it is and at what GB/s."""
    import logging

    from tests.conftest import TEST_TOKENIZER
    from twinfer.bench.random_model import make_random_checkpoint
    from twinfer.loader.safetensors import iter_safetensors, safetensors_files

    path = make_random_checkpoint(
        "qwen3-tiny", tmp_path / "sharded", dtype=torch.float32, max_shard_bytes=2**21,
        tokenizer_from=TEST_TOKENIZER,
    )  # fmt: skip
    files = safetensors_files(path)
    assert len(files) >= 3
    with caplog.at_level(logging.INFO, logger="twinfer.loader.safetensors"):
        names = [name for name, _ in iter_safetensors(files)]
    lines = [r.getMessage() for r in caplog.records if "loaded shard" in r.getMessage()]
    assert len(lines) == len(files) and names
    assert lines[0].startswith(f"loaded shard 1/{len(files)}: ")
    assert "(100%)" in lines[-1] and lines[-1].endswith("GB/s")
