"""--quantization int4: a plain checkpoint's dense layers quantized at load (symmetric, groups of
32) and run on torch's CPU int4 kernel; the oracle is transformers in fp32 on the same grid."""

from __future__ import annotations

import re

import pytest
import torch

from tests.hf_oracle import assert_greedy_matches_hf
from twinfer import LLM
from twinfer.layers.linear import LinearBase

NUM_TOKENS = 16
PROMPTS = ["The quick brown fox jumps over the lazy dog because", "def f(x):\n    return"]


def on_int4_grid(w: torch.Tensor) -> torch.Tensor:
    """The recipe, written out: each group of 32 scaled by absmax / 7, rounded, clamped to -8..7."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    scale = g.abs().amax(-1, keepdim=True) / 7
    return (torch.round(g / scale).clamp(-8, 7) * scale).reshape(n, k)


def test_int4_at_load_matches_transformers_on_the_same_grid(tiny_checkpoints) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoints("qwen3-tiny")
    llm = LLM(str(path), dtype="bfloat16", max_model_len=256, quantization="int4")
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.int4_weight is not None and m.weight.numel() == 0 for m in linears)
    assert "int4" in llm.engine.info.quant_config.describe()

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if re.search(r"proj\.weight$", name):
                p.copy_(on_int4_grid(p))
    tok = AutoTokenizer.from_pretrained(path)
    assert_greedy_matches_hf(llm, hf, tok, PROMPTS, NUM_TOKENS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantization": "int4", "dtype": "float32"}, "add --dtype bfloat16"),
        ({"quantization": "awq"}, "quantization 'awq' is not an online method"),
        ({"quantization": "sym_int4", "model": "gguf"}, "a GGUF file keeps its own formats"),
    ],
)
def test_bad_online_quantization_names_the_fix(tiny_checkpoints, smollm2_gguf, kwargs, message):
    model = str(smollm2_gguf) if kwargs.pop("model", None) else str(tiny_checkpoints("qwen3-tiny"))
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(model, max_model_len=64, **kwargs)


def test_an_already_quantized_checkpoint_refuses_the_flag() -> None:
    from twinfer.layers.quantization import get_quantization_config

    with pytest.raises(ValueError, match="already quantized; drop the flag"):
        get_quantization_config({"quant_method": "fp8"}, "int4")


def test_routers_stay_exact(tiny_checkpoints) -> None:
    from twinfer.layers.moe import MoELayer
    from twinfer.layers.quantization import UnquantizedLinearMethod

    llm = LLM(
        str(tiny_checkpoints("qwen3-moe-tiny")),
        dtype="bfloat16",
        max_model_len=64,
        quantization="int4",
    )
    moe = [m for m in llm.engine.runner.model.modules() if isinstance(m, MoELayer)]
    assert moe and all(type(m.gate.quant_method) is UnquantizedLinearMethod for m in moe)
    attn = [m for n, m in llm.engine.runner.model.named_modules() if n.endswith("qkv_proj")]
    assert attn and all(m.int4_weight is not None for m in attn)
