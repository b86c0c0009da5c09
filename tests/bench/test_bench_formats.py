"""The benchmark model in checkpoint formats (bench/formats.py): what `bench load` writes is a
block-FP8 checkpoint twinfer loads as one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from twinfer import LLM, SamplingParams
from twinfer.bench.formats import CHECKPOINT_FORMATS, with_format, write_fp8_checkpoint
from twinfer.layers.quantization.fp8 import Fp8BlockLinearMethod


def test_write_fp8_checkpoint_loads_as_fp8(tiny_checkpoints, tmp_path: Path) -> None:
    src = tiny_checkpoints("qwen3-moe-tiny")
    out = tmp_path / "fp8"
    # Blocks of 16: the tiny model's k and v projections are 16 rows each.
    nbytes = write_fp8_checkpoint(src, out, max_shard_bytes=200_000, block=(16, 16))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1  # small shards: one at a time on its way
    assert nbytes == sum(f.stat().st_size for f in shards) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in shards
    )  # the tensor bytes, headers aside
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    proj = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(out / index[proj], "pt") as f:
        assert f.get_tensor(proj).dtype == torch.float8_e4m3fn
        assert f.get_tensor(proj.replace("weight", "weight_scale_inv")).dtype == torch.float32
    with safe_open(out / index["model.embed_tokens.weight"], "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        **CHECKPOINT_FORMATS["fp8"],
        "weight_block_size": [16, 16],
    }

    llm = LLM(str(out), device="cpu", dtype="bfloat16", moe_backend="torch", max_model_len=64)
    qkv = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.quant_method, Fp8BlockLinearMethod)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert len(llm.generate("hi", params, use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_with_format_copies_config_and_tokenizer(tiny_checkpoints, tmp_path: Path) -> None:
    out = with_format(tiny_checkpoints("qwen3-moe-tiny"), "ct_int4", tmp_path / "ct")
    assert not list(out.glob("*.safetensors"))  # no weights: --load-format dummy
    assert (out / "tokenizer.json").is_file()
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
