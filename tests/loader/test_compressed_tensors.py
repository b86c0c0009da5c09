"""compressed-tensors pack-quantized INT4 checkpoints (Kimi-K2.5, llm-compressor "AWQ 4bit"
releases): written by the compressed-tensors library, read back by transformers (decompressed,
fp32) as the oracle; twinfer keeps the packed integers (and runs the CPU int4 kernel in bf16)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_oracle import assert_greedy_matches_hf
from tests.loader.test_fp8 import NUM_TOKENS, PROMPTS, save_tiny_model  # the same tiny Qwen3
from twinfer import LLM, SamplingParams
from twinfer.layers.linear import LinearBase
from twinfer.layers.quantization.compressed_tensors import PackedIntLinearMethod
from twinfer.layers.quantization.compressed_tensors import PackedIntMoEMethod as PackedIntMoE

IGNORE = ["lm_head", "re:.*layers\\.1\\.self_attn\\..*"]


def int4_scales(w: torch.Tensor, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' minmax observer for int4 groups: (scale, signed zero point int8)
    [N, K/g]; symmetric: absmax / 7.5 and zero 0."""
    groups = w.reshape(w.shape[0], -1, group)
    if symmetric:
        scale = (groups.abs().amax(-1) / 7.5).clamp(min=1e-8)
        return scale, torch.zeros_like(scale, dtype=torch.int8)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    return scale, (-8 - torch.round(lo / scale)).clamp(-8, 7).to(torch.int8)


def write_ct_checkpoint(out: Path, group: int, symmetric: bool) -> Path:
    """A random tiny Qwen3 saved by transformers; its projections quantized and packed by
    compressed-tensors' own `quantize` and `pack_to_int32`, its config by `QuantizationConfig`."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )
    from compressed_tensors.quantization.lifecycle.forward import quantize

    tensors = save_tiny_model(out)
    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group
    )
    for name in list(tensors):
        module = name.removesuffix(".weight")
        if not name.endswith("proj.weight") or re.match(r".*layers\.1\.self_attn\..*", module):
            continue
        w = tensors.pop(name).float()
        scale, zero = int4_scales(w, group, symmetric)
        q = quantize(x=w, scale=scale, zero_point=zero, args=args, dtype=torch.int8)
        tensors[f"{module}.weight_packed"] = pack_to_int32(q, 4)
        tensors[f"{module}.weight_scale"] = scale.bfloat16()
        tensors[f"{module}.weight_shape"] = torch.tensor(w.shape)
        if not symmetric:
            tensors[f"{module}.weight_zero_point"] = pack_to_int32(zero, 4, packed_dim=0)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=IGNORE,
    )
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {**qc.model_dump(), "quant_method": "compressed-tensors"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module", params=[(32, True), (128, False)], ids=["g32-sym", "g128-asym"])
def ct_dir(request, tmp_path_factory) -> Path:
    group, symmetric = request.param
    return write_ct_checkpoint(tmp_path_factory.mktemp("ct"), group, symmetric)


def oracle_model(ct_dir: Path, tmp_path: Path):
    """transformers' reading of the checkpoint in fp32. NOTE: transformers 5.25 refuses the
    asymmetric files' packed zero points (it expects them unpacked), so those are decompressed by
    compressed-tensors' own `unpack_from_int32` and `dequantize` into a plain checkpoint first."""
    import shutil

    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from transformers import AutoModelForCausalLM

    cfg = json.loads((ct_dir / "config.json").read_text())
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    if not weights["symmetric"]:
        plain = tmp_path / "plain"
        shutil.copytree(ct_dir, plain)
        tensors = load_file(plain / "model.safetensors")
        args = QuantizationArgs(**weights)
        for name in [n for n in tensors if n.endswith(".weight_packed")]:
            module = name.removesuffix(".weight_packed")
            shape = tuple(tensors.pop(f"{module}.weight_shape").tolist())
            scale = tensors.pop(f"{module}.weight_scale")
            q = unpack_from_int32(tensors.pop(name), 4, shape)
            zp_shape = (shape[0], scale.shape[1])
            zp = unpack_from_int32(tensors.pop(f"{module}.weight_zero_point"), 4, zp_shape, 0)
            w = dequantize(x_q=q, scale=scale.float(), zero_point=zp, args=args)
            tensors[f"{module}.weight"] = w.float()
        save_file(tensors, plain / "model.safetensors", metadata={"format": "pt"})
        del cfg["quantization_config"]
        (plain / "config.json").write_text(json.dumps(cfg))
        ct_dir = plain
    return AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32).eval()


def _linears(llm: LLM) -> dict[str, LinearBase]:
    return {m.prefix: m for m in llm.engine.runner.model.modules() if isinstance(m, LinearBase)}


def test_ct_int4_matches_transformers_fp32(ct_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    llm = LLM(str(ct_dir), dtype="float32", max_model_len=256)
    layers = _linears(llm)
    packed = layers["model.layers.0.mlp.gate_up_proj"]
    assert isinstance(packed.quant_method, PackedIntLinearMethod)
    assert packed.weight_packed.dtype == torch.int32  # kept packed: 4 bits a weight
    assert not isinstance(
        layers["model.layers.1.self_attn.qkv_proj"].quant_method, PackedIntLinearMethod
    )  # ignored by the regex
    assert "pack-quantized" in llm.engine.info.quant_config.describe()

    hf = oracle_model(ct_dir, tmp_path)
    tok = AutoTokenizer.from_pretrained(ct_dir)
    assert_greedy_matches_hf(llm, hf, tok, PROMPTS, NUM_TOKENS, same_prefix=8)


def test_ct_int4_bf16_runs_the_int4_kernel_on_the_same_grid(ct_dir: Path) -> None:
    """bf16 on the CPU: groups of 32/128 go to torch's int4 kernel losslessly; its output equals
    the dequantized reference within bf16 rounding."""
    llm = LLM(str(ct_dir), dtype="bfloat16", max_model_len=256)
    layer = _linears(llm)["model.layers.0.mlp.down_proj"]
    assert layer.int4_weight is not None and layer.weight_packed.numel() == 0  # packed copy freed
    ref_llm = LLM(str(ct_dir), dtype="float32", max_model_len=256)
    ref = _linears(ref_llm)["model.layers.0.mlp.down_proj"]
    x = torch.randn(5, 384)
    want = ref(x)
    got = layer(x.bfloat16()).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "nvfp4-pack-quantized"}, "format 'nvfp4-pack-quantized' (config group"),
        ({"weights": {"num_bits": 4, "type": "float"}}, "float 4-bit weights are not supported"),
        (
            {
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "strategy": "group",
                    "actorder": "dynamic",
                    "group_size": 32,
                }
            },
            "actorder 'dynamic'",
        ),  # fmt: skip
        ({"input_activations": {"num_bits": 8}}, "quantizes activations too"),
    ],
)
def test_bad_ct_configs_name_the_problem(tmp_path, change, message) -> None:
    from twinfer.layers.quantization import get_quantization_config

    group = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
             "group_size": 32, "symmetric": True}}  # fmt: skip
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    config["config_groups"] = {"group_0": group | change}
    with pytest.raises(ValueError, match=re.escape(message)):
        get_quantization_config(config)


def test_dummy_weights_fill_packed_integers(ct_dir: Path) -> None:
    """--load-format dummy (benchmarks of a shape) fills int32 packed words too."""
    llm = LLM(str(ct_dir), dtype="float32", max_model_len=64, load_format="dummy")
    out = llm.generate("hi", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_int4_kernel_needs_rows_in_16s_else_the_reference_path() -> None:
    """torch's CPU int4 kernel packs rows by 16: a 24-row layer computes by dequantizing."""
    from twinfer.layers.linear import ReplicatedLinear
    from twinfer.layers.quantization.compressed_tensors import IntWeightScheme

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        method = PackedIntLinearMethod(IntWeightScheme(4, 32, True))
        layer = ReplicatedLinear(64, 24, prefix="odd", quant_method=method)
    finally:
        torch.set_default_dtype(previous)
    layer.weight_packed.data.copy_(torch.randint(-(2**31), 2**31 - 1, (24, 8)))
    layer.weight_scale.data.copy_(torch.rand(24, 2) / 10)
    layer.process_weights_after_loading()
    assert layer.int4_weight is None
    q, _ = method.integers(layer)
    want = torch.nn.functional.linear(
        torch.ones(1, 64), q.float() * layer.weight_scale.repeat_interleave(32, 1)
    )
    got = layer(torch.ones(1, 64, dtype=torch.bfloat16)).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_mixtral_experts_are_matched_by_their_checkpoint_names() -> None:
    from twinfer.layers.quantization import get_quantization_config
    from twinfer.layers.quantization.fp8 import Fp8BlockMoEMethod

    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}
    experts_only = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "g": {"targets": ["re:.*block_sparse_moe\\.experts\\..*"], "weights": weights}
        },
    }
    config = get_quantization_config(experts_only)
    assert isinstance(config.moe_method("model.layers.0.block_sparse_moe", "w1"), PackedIntMoE)
    assert config.moe_method("model.layers.0.mlp") is None  # a name the targets do not cover
    fp8 = get_quantization_config(
        {
            "quant_method": "fp8",
            "fmt": "float8_e4m3fn",  # MiniMax-M2's spelling
            "weight_block_size": [128, 128],
            "modules_to_not_convert": ["model.layers.0.block_sparse_moe.experts"],
        }
    )
    assert fp8.moe_method("model.layers.0.block_sparse_moe", "w1") is None
    assert isinstance(fp8.moe_method("model.layers.1.block_sparse_moe", "w1"), Fp8BlockMoEMethod)
