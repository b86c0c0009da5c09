"""Block-FP8 checkpoints (DeepSeek / Qwen / MiniMax style) load kept as FP8 and give
transformers' tokens; transformers reading the same files (dequantized, fp32) is the oracle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TEST_TOKENIZER
from tests.hf_oracle import assert_greedy_matches_hf
from twinfer import LLM
from twinfer.layers.linear import LinearBase
from twinfer.layers.quantization.fp8 import Fp8BlockLinearMethod, dequantize_blocks

BLOCK = 128
NUM_TOKENS = 24
PROMPTS = ["The quick brown fox jumps over the lazy dog because", "def f(x):\n    return"]
# q 4x64 and kv 2x64 rows, gate/up 384 rows: block-aligned, so fused layers keep whole blocks.
# NOTE: transformers' FP8 reader needs every dimension to be whole blocks (DeepSeek's 576-row
# kv_a_proj is not); partial blocks are checked against an element-wise reference below.
SHAPE = dict(
    hidden_size=256,
    intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_hidden_layers=2,
)
# One fused layer's projections and the lm_head stay bf16 as real checkpoints list them.
NOT_CONVERTED = ["lm_head", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def quantize_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], float32 scale_inv [ceil(N/b), ceil(K/b)]), each block
    scaled so its largest magnitude maps to e4m3's 448 (DeepSeek's reference recipe)."""
    n, k = w.shape
    padded = torch.nn.functional.pad(w.float(), (0, -k % block, 0, -n % block))
    blocks = padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(padded.shape)[:n, :k].contiguous(), scale


def save_tiny_model(out: Path, arch: str = "qwen3", **config_overrides) -> dict[str, torch.Tensor]:
    """A random tiny model (SHAPE) saved by transformers with the test tokenizer; returns its
    tensors, for a test to rewrite in a weight format."""
    import transformers

    from twinfer.bench.random_model import load_tokenizer

    config_cls = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[arch]
    model_cls = {"qwen3": transformers.Qwen3ForCausalLM, "llama": transformers.LlamaForCausalLM}
    config = config_cls(vocab_size=49152, **(SHAPE | config_overrides))
    torch.manual_seed(0)
    model = model_cls[arch](config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.1)  # outweigh the embedding: continuations depend on context
    model.save_pretrained(out)
    load_tokenizer(TEST_TOKENIZER).save_pretrained(out)
    return load_file(out / "model.safetensors")


def write_fp8_checkpoint(out: Path, arch: str = "qwen3", **config_overrides) -> Path:
    """A random tiny model saved by transformers, its projections then rewritten as block FP8."""
    tensors = save_tiny_model(out, arch, **config_overrides)
    for name in list(tensors):
        module = name.removesuffix(".weight")
        if name.endswith("proj.weight") and module not in NOT_CONVERTED:
            tensors[name], tensors[f"{module}.weight_scale_inv"] = quantize_blocks(tensors[name])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": NOT_CONVERTED,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8"))


def test_fp8_checkpoint_matches_transformers_and_stays_fp8(fp8_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, FineGrainedFP8Config

    llm = LLM(str(fp8_dir), dtype="float32", max_model_len=256)
    layers = {m.prefix: m for m in llm.engine.runner.model.modules() if isinstance(m, LinearBase)}
    fp8 = layers["model.layers.0.self_attn.qkv_proj"]
    assert isinstance(fp8.quant_method, Fp8BlockLinearMethod)
    assert fp8.weight.dtype == torch.float8_e4m3fn  # 1 byte a weight, as published
    assert tuple(fp8.weight_scale_inv.shape) == (4, 2)  # (256 + 2 x 128) rows, 256 columns
    assert layers["model.layers.1.mlp.gate_up_proj"].weight.dtype != torch.float8_e4m3fn
    assert layers["model.layers.1.mlp.down_proj"].weight.dtype == torch.float8_e4m3fn
    assert "fp8" in llm.engine.info.quant_config.describe()

    hf = AutoModelForCausalLM.from_pretrained(
        fp8_dir, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)
    ).eval()
    tok = AutoTokenizer.from_pretrained(fp8_dir)
    assert_greedy_matches_hf(llm, hf, tok, PROMPTS, NUM_TOKENS, same_prefix=8)


def test_partial_blocks_dequantize_element_wise() -> None:
    w = torch.randn(300, 200)
    q, scale = quantize_blocks(w)
    assert tuple(scale.shape) == (3, 2)
    got = dequantize_blocks(q, scale, (BLOCK, BLOCK), torch.float32)
    rows, cols = torch.arange(300)[:, None] // BLOCK, torch.arange(200)[None, :] // BLOCK
    assert torch.equal(got, q.float() * scale[rows, cols])
    assert (got - w).abs().max() <= w.abs().max() / 8  # e4m3 keeps 3 mantissa bits


def _edit_quant_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] |= changes
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"quant_method": "exl9"},
            "quant_method 'exl9', which twinfer does not load yet; supported",
        ),
        ({"weight_block_size": None}, "one scale per tensor"),
        ({"weight_block_size": [96, 128]}, "weight_scale_inv has shape [2, 3] but the model"),
        ({"activation_scheme": "static"}, "activation_scheme 'static' is not supported"),
        ({"fmt": "e5m2"}, "fmt 'e5m2': twinfer reads e4m3 FP8 weights"),
        (
            {"modules_to_not_convert": ["model.layers.0.self_attn.q_proj"]},
            "quantizes some of model.layers.0.self_attn.q_proj",
        ),
    ],
)
def test_bad_fp8_configs_name_the_problem(fp8_dir, tmp_path, changes, message) -> None:
    bad = _edit_quant_config(fp8_dir, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(str(bad), dtype="float32", max_model_len=64)


def test_a_fused_layer_must_keep_whole_scale_blocks() -> None:
    from twinfer.layers.linear import QKVParallelLinear

    method = Fp8BlockLinearMethod((96, 128))
    layer = QKVParallelLinear(256, 64, 4, 2, prefix="qkv_proj", quant_method=method)
    scale = layer.weight_scale_inv  # q rows [0, 256), k [256, 384): k starts inside a block
    with pytest.raises(ValueError, match=r"qkv_proj: rows 256\.\.384 of 384 do not fall on"):
        scale.weight_loader(scale, torch.ones(2, 2), "k")
