"""Random-weight checkpoints: hub layout, loadable by transformers, deterministic, sharded."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from twinfer.bench import random_model as rm

TINY = [name for name in rm.SHAPES if name != "qwen3-30b-a3b"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    # The conftest tokenizer saved once: loading the GGUF for every checkpoint would cost 8 s each.
    path = tmp_path_factory.mktemp("tokenizer")
    smollm2_tokenizer.save_pretrained(path)
    return path


def _stored(out: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, file) over all safetensors files of a checkpoint."""
    found = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                found[name] = (f.get_slice(name).get_shape(), file.name)
    return found


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(out.glob("*.safetensors")):
        h.update(file.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("shape", TINY)
def test_tiny_checkpoint_loads_in_transformers(shape: str, tmp_path: Path, tokenizer_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = rm.make_random_checkpoint(shape, tmp_path / shape, tokenizer_from=tokenizer_dir)
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [rm.SHAPES[shape].architecture]
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)

    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    # Every stored tensor is a parameter the model has (as the hub would have written it).
    assert sum(p.numel() for p in model.parameters()) == rm.count_parameters(shape)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    assert len(new) == 20
    assert len(set(new)) >= 5, f"degenerate greedy output {new}"


def test_moe_names_are_per_expert(tmp_path: Path):
    q = _stored(rm.make_random_checkpoint("qwen3-moe-tiny", tmp_path / "q", tokenizer_from=None))
    assert q["model.layers.1.mlp.experts.7.gate_proj.weight"][0] == [32, 64]
    assert q["model.layers.1.mlp.experts.7.down_proj.weight"][0] == [64, 32]
    assert q["model.layers.1.mlp.gate.weight"][0] == [8, 64]
    assert not any("gate_up_proj" in name for name in q)
    m = _stored(rm.make_random_checkpoint("mixtral-tiny", tmp_path / "m", tokenizer_from=None))
    for w, shape in (("w1", [32, 64]), ("w2", [64, 32]), ("w3", [32, 64])):
        assert m[f"model.layers.0.block_sparse_moe.experts.7.{w}.weight"][0] == shape
    assert m["model.layers.0.block_sparse_moe.gate.weight"][0] == [8, 64]
    # Sparse variant: MoE only where decoder_sparse_step and mlp_only_layers both say so.
    s = _stored(
        rm.make_random_checkpoint("qwen3-moe-sparse-tiny", tmp_path / "s", tokenizer_from=None)
    )
    moe = sorted({int(n.split(".")[2]) for n in s if ".experts." in n})
    dense = sorted({int(n.split(".")[2]) for n in s if n.endswith("mlp.up_proj.weight")})
    assert (moe, dense) == ([1, 5], [0, 2, 3, 4])
    # Tied embeddings are stored once.
    t = _stored(rm.make_random_checkpoint("llama-tiny", tmp_path / "t", tokenizer_from=None))
    assert "model.embed_tokens.weight" in t and "lm_head.weight" not in t


def test_deterministic_and_seeded(tmp_path: Path):
    kw = dict(tokenizer_from=None, num_layers=1)
    a = rm.make_random_checkpoint("qwen3-tiny", tmp_path / "a", seed=3, **kw)
    b = rm.make_random_checkpoint("qwen3-tiny", tmp_path / "b", seed=3, **kw)
    c = rm.make_random_checkpoint("qwen3-tiny", tmp_path / "c", seed=4, **kw)
    assert _digest(a) == _digest(b) != _digest(c)
    # A layer-count override keeps the values of the layers it keeps.
    two = rm.make_random_checkpoint("qwen3-tiny", tmp_path / "two", seed=3, tokenizer_from=None)
    name = "model.layers.0.mlp.down_proj.weight"
    with (
        safe_open(a / "model.safetensors", "pt") as f,
        safe_open(two / "model.safetensors", "pt") as g,
    ):
        assert torch.equal(f.get_tensor(name), g.get_tensor(name))
    with safe_open(a / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
        g = f.get_tensor("model.layers.0.input_layernorm.weight").float()
    assert abs(w.std().item() - 0.1) < 0.01 and abs(w.mean().item()) < 0.01
    assert abs(g.mean().item() - 1.0) < 0.01 and 0 < g.std().item() < 0.05


def test_sharded_checkpoint_has_valid_index(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    whole = rm.make_random_checkpoint("qwen3-moe-tiny", tmp_path / "whole", tokenizer_from=None)
    out = rm.make_random_checkpoint(
        "qwen3-moe-tiny", tmp_path / "sharded", tokenizer_from=None, max_shard_bytes=2**21
    )
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = _stored(out)
    assert index["weight_map"] == {name: file for name, (_, file) in stored.items()}
    num_params = rm.count_parameters("qwen3-moe-tiny")
    assert index["metadata"] == {"total_parameters": num_params, "total_size": 2 * num_params}
    for file in files:  # no shard past the limit, unless it holds one tensor that is
        names = [name for name, (_, f) in stored.items() if f == file]
        data = sum(2 * torch.Size(stored[name][0]).numel() for name in names)
        assert data <= 2**21 or len(names) == 1
    # Same values as the single-file checkpoint: values depend on names, not on the layout.
    with safe_open(whole / "model.safetensors", "pt") as f:
        name = "model.layers.1.mlp.experts.3.up_proj.weight"
        with safe_open(out / index["weight_map"][name], "pt") as g:
            assert torch.equal(f.get_tensor(name), g.get_tensor(name))
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_bench_shape_table():
    config = rm.build_config("qwen3-30b-a3b", num_layers=2)
    assert config.num_hidden_layers == 2 and config.num_experts == 128
    specs = {s.name: s.shape for s in rm.tensor_specs(config)}
    h, i, e, v = 2048, 768, 128, 151936
    assert specs["model.embed_tokens.weight"] == specs["lm_head.weight"] == (v, h)
    assert specs["model.layers.1.self_attn.q_proj.weight"] == (32 * 128, h)
    assert specs["model.layers.1.self_attn.k_proj.weight"] == (4 * 128, h)
    assert specs["model.layers.1.self_attn.o_proj.weight"] == (h, 32 * 128)
    assert specs["model.layers.1.self_attn.q_norm.weight"] == (128,)
    assert specs["model.layers.1.mlp.gate.weight"] == (e, h)
    assert specs[f"model.layers.1.mlp.experts.{e - 1}.gate_proj.weight"] == (i, h)
    assert specs[f"model.layers.1.mlp.experts.{e - 1}.down_proj.weight"] == (h, i)
    assert "model.layers.2.input_layernorm.weight" not in specs
    attn = 2 * (32 * 128 * h) + 2 * (4 * 128 * h) + 2 * 128
    per_layer = attn + e * 3 * i * h + e * h + 2 * h
    total = sum(torch.Size(s).numel() for s in specs.values())
    assert total == 2 * v * h + h + 2 * per_layer
    assert rm.count_parameters("qwen3-30b-a3b") == 2 * v * h + h + 48 * per_layer == 30_532_122_624


def test_bad_shape_and_dtype():
    with pytest.raises(ValueError, match="qwen3-30b-a3b") as err:
        rm.make_random_checkpoint("gpt-17", "/nonexistent", tokenizer_from=None)
    assert all(name in str(err.value) for name in rm.SHAPES)
    with pytest.raises(ValueError, match="bf16"):
        rm.parse_dtype("int3")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    parser = argparse.ArgumentParser()
    rm.add_cli_args(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["mixtral-tiny", str(out), "--num-layers", "1", "--dtype", "fp16", "--seed", "7"]
        + ["--tokenizer", "none", "--max-shard-size", "1MiB"]
    )
    assert args.max_shard_size == 2**20
    assert rm.main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["dtype"] == "float16"
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert "wrote mixtral-tiny" in capsys.readouterr().out
    assert rm.main(parser.parse_args(["nope", str(out)])) == 2
    assert "unknown model shape" in capsys.readouterr().err


def test_default_tokenizer_is_smollm2(smollm2_gguf: Path):
    assert smollm2_gguf == rm.DEFAULT_TOKENIZER
