"""AutoAWQ (GEMM) and GPTQ checkpoints, read losslessly as compressed-tensors' layout.

Writers: the tests pack q / zero points / scales themselves, word by word from the published
layouts (../shared/reference/models-and-formats.md §11.3-11.4), not with twinfer's converters.
Oracles: AWQ files are read back by compressed-tensors' own AutoAWQConverter (an independent
reader) and dequantized by compressed-tensors into a plain fp32 checkpoint; GPTQ files by the
test's dequantization W = s[g_idx] (q - z) into one. transformers runs the plain checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_oracle import assert_greedy_matches_hf
from tests.loader.test_fp8 import NUM_TOKENS, PROMPTS, save_tiny_model
from twinfer import LLM
from twinfer.layers.linear import LinearBase
from twinfer.layers.quantization import get_quantization_config
from twinfer.layers.quantization.compressed_tensors import PackedIntLinearMethod

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble k of a word: column 8w + AWQ_ORDER[k]
SKIPPED = "layers.1.self_attn"  # AWQ's modules_to_not_convert (a substring)


def _quantize(w: torch.Tensor, group: int, g_idx: torch.Tensor, symmetric: bool):
    """w [N, K] -> (q [N, K] in 0..15, z [N, G] in 0..15, s [N, G] fp16) with W ~ (q - z) s for
    column c in group g_idx[c]."""
    n, k = w.shape
    cols = torch.argsort(g_idx, stable=True).reshape(-1, group)  # [G, g] the columns of a group
    groups = w[:, cols]  # [N, G, g]
    if symmetric:
        s = (groups.abs().amax(-1) / 7.5).clamp(min=1e-6)
        z = torch.full_like(s, 8, dtype=torch.int64)
    else:
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-6)
        z = torch.round(-lo / s).clamp(0, 15).long()
    s = s.half()
    q = torch.round(w / s.float()[:, g_idx]) + z[:, g_idx]
    return q.clamp(0, 15).long(), z, s


def _pack_words(values: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """values [R, C] in 0..15 -> int32 [R, C/8]: nibble k of word w = column 8w + order[k]."""
    order = order or list(range(8))
    r, c = values.shape
    words = torch.zeros(r, c // 8, dtype=torch.int64)
    for k in range(8):
        words |= values[:, order[k] :: 8].long() << (4 * k)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _write(out: Path, kind: str, group: int, symmetric=False, desc_act=False, v1=False) -> Path:
    tensors = save_tiny_model(out)
    plain = {}  # the oracle's fp32 weights
    gen = torch.Generator().manual_seed(1)
    orders: dict[str, torch.Tensor] = {}  # act-order g_idx per fused layer
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        module = name.removesuffix(".weight")
        if kind == "awq" and SKIPPED in module:
            continue
        w = tensors.pop(name).float()
        n, k = w.shape
        g_idx = torch.arange(k) // group
        if desc_act:  # fused projections share their input, so act-order gives them one g_idx
            fused = re.sub(r"(q|k|v|gate|up)_proj$", "fused", module)
            g_idx = orders.setdefault(fused, g_idx[torch.randperm(k, generator=gen)])
        q, z, s = _quantize(w, group, g_idx, symmetric)
        plain[name] = (q - z[:, g_idx]).float() * s.float()[:, g_idx]
        if kind == "awq":  # [K, N/8] packed along N in AWQ order; zeros [G, N/8]; scales [G, N]
            tensors[f"{module}.qweight"] = _pack_words(q.t(), AWQ_ORDER)
            tensors[f"{module}.qzeros"] = _pack_words(z.t(), AWQ_ORDER)
        else:  # [K/8, N] packed along K; zeros [G, N/8] (v1: z - 1); scales [G, N]; g_idx [K]
            tensors[f"{module}.qweight"] = _pack_words(q).t().contiguous()
            tensors[f"{module}.qzeros"] = _pack_words(z.t() - (1 if v1 else 0))
            tensors[f"{module}.g_idx"] = g_idx.to(torch.int32)
        tensors[f"{module}.scales"] = s.t().contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    if kind == "awq":
        quant = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                 "version": "gemm", "modules_to_not_convert": [SKIPPED]}  # fmt: skip
    else:
        version = "gptq" if v1 else "gptq_v2"
        quant = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": symmetric,
                 "desc_act": desc_act, "checkpoint_format": version}  # fmt: skip
    cfg["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(cfg))
    torch.save(plain, out / "plain_weights.pt")  # beside the checkpoint: the GPTQ oracle's
    return out


def _plain_checkpoint(src: Path, weights: dict[str, torch.Tensor], out: Path) -> Path:
    shutil.copytree(src, out)
    tensors = {n: t for n, t in load_file(src / "model.safetensors").items()
               if not re.search(r"\.(qweight|qzeros|scales|g_idx)$", n)}  # fmt: skip
    tensors.update(weights)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _awq_oracle_weights(src: Path) -> dict[str, torch.Tensor]:
    """compressed-tensors' AutoAWQConverter reads the AWQ tensors; its unpack + dequantize give
    the fp32 weights."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    config = json.loads((src / "config.json").read_text())["quantization_config"]
    converter = AutoAWQConverter.from_autoawq_config(config)
    tensors = converter.process(load_file(src / "model.safetensors"))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                            group_size=config["group_size"])  # fmt: skip
    out = {}
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        module = name.removesuffix(".weight_packed")
        scale = tensors[f"{module}.weight_scale"].float()
        shape = (scale.shape[0], scale.shape[1] * config["group_size"])
        q = unpack_from_int32(tensors[name], 4, shape)
        zp = tensors[f"{module}.weight_zero_point"]
        if zp.dtype == torch.int32:  # packed along the output dim
            zp = unpack_from_int32(zp, 4, scale.shape, 0)
        out[f"{module}.weight"] = dequantize(x_q=q, scale=scale, zero_point=zp, args=args)
    return out


def _linears(llm: LLM) -> dict[str, LinearBase]:
    return {m.prefix: m for m in llm.engine.runner.model.modules() if isinstance(m, LinearBase)}


CASES = {
    "awq-g32": dict(kind="awq", group=32),
    "gptq-v2-g64-asym": dict(kind="gptq", group=64),
    "gptq-v1-g32-sym": dict(kind="gptq", group=32, symmetric=True, v1=True),
    "gptq-v1-g64-asym-desc-act": dict(kind="gptq", group=64, desc_act=True, v1=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_awq_gptq_match_transformers_on_the_same_weights(case: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = CASES[case]
    src = _write(tmp_path / "q", **spec)
    plain = torch.load(src / "plain_weights.pt")
    if spec["kind"] == "awq":
        independent = _awq_oracle_weights(src)
        for name, w in independent.items():  # the writer and compressed-tensors agree
            torch.testing.assert_close(w.float(), plain[name], rtol=0, atol=1e-6)
        plain = independent
    ref = _plain_checkpoint(src, plain, tmp_path / "plain")

    llm = LLM(str(src), dtype="float32", max_model_len=256)
    layers = _linears(llm)
    gate_up = layers["model.layers.0.mlp.gate_up_proj"]
    assert isinstance(gate_up.quant_method, PackedIntLinearMethod)
    assert gate_up.weight_packed.dtype == torch.int32  # kept packed
    skipped = layers["model.layers.1.self_attn.qkv_proj"].quant_method
    assert isinstance(skipped, PackedIntLinearMethod) == (spec["kind"] == "gptq")
    assert spec["kind"] in llm.engine.info.quant_config.describe()
    if spec.get("desc_act"):
        assert layers["model.layers.0.self_attn.o_proj"].input_perm is not None

    hf = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    assert_greedy_matches_hf(llm, hf, tok, PROMPTS, NUM_TOKENS, same_prefix=8)
    w = layers["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, w.input_size_local)
    want = x @ plain["model.layers.0.mlp.down_proj.weight"].t()
    torch.testing.assert_close(w(x), want, rtol=1e-4, atol=1e-4)  # lossless: fp32 rounding only


def test_legacy_quantize_config_json_is_read(tmp_path: Path) -> None:
    """Older AutoGPTQ exports keep the settings in quantize_config.json beside config.json."""
    src = _write(tmp_path / "q", kind="gptq", group=64)
    cfg = json.loads((src / "config.json").read_text())
    quant = cfg.pop("quantization_config")
    del quant["quant_method"]
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "quantize_config.json").write_text(json.dumps(quant))
    llm = LLM(str(src), dtype="float32", max_model_len=64)
    assert llm.engine.info.quant_config.describe().startswith("gptq (gptq_v2, int4 g64")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "awq", "bits": 8}, "4-bit GEMM format"),
        ({"quant_method": "awq", "version": "gemv"}, "version 'gemv'"),
        ({"quant_method": "awq", "zero_point": False}, "zero_point false"),
        ({"quant_method": "gptq", "bits": 3}, "3-bit weights"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
        ({"quant_method": "gptq", "group_size": 0}, "group_size must be"),
        ({"quant_method": "exl2"}, "quant_method 'exl2'"),
    ],
)
def test_bad_awq_gptq_configs_name_the_problem(config, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        get_quantization_config(config)


def test_fused_projections_with_different_act_orders_are_refused(tmp_path: Path) -> None:
    src = _write(tmp_path / "q", kind="gptq", group=64, desc_act=True)
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="different act-order"):
        LLM(str(src), dtype="float32", max_model_len=64)
