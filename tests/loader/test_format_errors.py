"""Bad input the weight formats refuse, each with a message naming the fix (the ones a
checkpoint or a flag can trigger without a GPU or a whole model)."""

from __future__ import annotations

import re

import pytest
import torch

from twinfer.layers.quantization import get_quantization_config
from twinfer.layers.quantization.online_fp8 import OnlineFp8Config
from twinfer.layers.quantization.online_int4 import OnlineInt4Config


def test_online_methods_name_the_device_they_run_on() -> None:
    with pytest.raises(ValueError, match=re.escape("on a GPU use --quantization fp8")):
        OnlineInt4Config.check_device(torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match=re.escape("on the CPU use --quantization int4")):
        OnlineFp8Config.check_device(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="add --dtype bfloat16"):
        OnlineFp8Config.check_device(torch.device("cuda"), torch.float32)


def test_gptq_v1_zero_point_overflow_names_gptq_v2() -> None:
    config = get_quantization_config(
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
         "checkpoint_format": "gptq"}
    )  # fmt: skip
    stored_minus_one = torch.full((1, 1), -1, dtype=torch.int32)  # every nibble 15: z = 16
    with pytest.raises(ValueError, match="re-export the checkpoint as gptq_v2"):
        config.convert("qzeros", stored_minus_one)


def _ct(weights: dict, fmt: str = "pack-quantized") -> dict:
    group = {"targets": ["Linear"], "weights": weights, "format": fmt}
    return {"quant_method": "compressed-tensors", "config_groups": {"g": group}}


def test_expert_schemes_twinfer_cannot_keep_are_refused_by_name() -> None:
    act_order = _ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                     "actorder": "group"})  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("without act-order (desc_act false)")):
        get_quantization_config(act_order).moe_method("model.layers.0.mlp")
    channel_fp8 = _ct({"num_bits": 8, "type": "float", "strategy": "channel"}, "float-quantized")
    with pytest.raises(ValueError, match="FP8 experts in blocks"):
        get_quantization_config(channel_fp8).moe_method("model.layers.0.mlp")


def test_fp8_groups_that_do_not_divide_the_experts_name_the_flag(tiny_checkpoints) -> None:
    """A block-FP8 checkpoint kept in the CPU engine needs its 128-column blocks to divide the
    expert sizes (the tiny model's are 64 and 32): the error says which flag to use instead."""
    import json
    import shutil

    from twinfer import LLM
    from twinfer.native import native_engine

    if native_engine is None:
        pytest.skip("the CPU engine keeps FP8 only natively")
    src = tiny_checkpoints("qwen3-moe-tiny")
    out = src.parent / f"{src.name}-fp8cfg"
    if not out.exists():
        shutil.copytree(src, out)
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                      "weight_block_size": [128, 128]}  # fmt: skip
        (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape("use --moe-cpu-dtype bf16 or int4")):
        LLM(str(out), device="cpu", load_format="dummy", max_model_len=64)
