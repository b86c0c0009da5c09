"""The GGUF reader against its oracles: transformers (SmolLM2), gguf-py (dequantization, names)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH_NAMES, GGUFWriter, get_tensor_name_map
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as np_dequantize
from gguf.quants import quantize as np_quantize

from twinfer.loader.gguf import GGUFCheckpoint, GGUFTensorInfo, dequantize, is_gguf_file

# ------------------------------------------------------------------------ SmolLM2 vs transformers


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf: Path):
    """transformers' own GGUF load (numpy dequantization, ~20 s): loaded once for the module."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def checkpoint(smollm2_gguf: Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(smollm2_gguf)


def test_weights_match_transformers(checkpoint: GGUFCheckpoint, hf_model) -> None:
    ref = hf_model.state_dict()
    ours = dict(checkpoint.weights(torch.float32))
    # No output.weight in the file: lm_head is tied to the embedding, so we emit no lm_head.
    assert set(ref) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(ref)
    assert torch.equal(ref["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), name


def test_weights_cast_to_dtype(checkpoint: GGUFCheckpoint) -> None:
    name, tensor = next(iter(checkpoint.weights(torch.bfloat16)))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (49152, 576)


def test_hf_config_matches_transformers(checkpoint: GGUFCheckpoint, hf_model) -> None:
    from transformers import AutoConfig

    cfg = checkpoint.hf_config()
    ref = hf_model.config
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: cfg[k] for k in expected} == expected
    rope_theta = getattr(ref, "rope_parameters", None) or {"rope_theta": ref.rope_theta}
    assert cfg["rope_theta"] == rope_theta["rope_theta"]
    for key in expected.keys() - {"architectures", "rope_theta"}:
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps)
    built = AutoConfig.for_model(**cfg)
    assert type(built).__name__ == "LlamaConfig" and built.num_key_value_heads == 3


def test_generation_config(checkpoint: GGUFCheckpoint) -> None:
    assert checkpoint.generation_config() == {"bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def tokenizer(checkpoint: GGUFCheckpoint):
    return checkpoint.tokenizer()


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "你好，世界",
        "🙂👍",
        "def f(x):\n    return x ** 2  # square\n",
        "  two\t\ttabs",
    ],
)
def test_tokenizer_matches_transformers(tokenizer, smollm2_tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == smollm2_tokenizer.encode(text)
    assert tokenizer.decode(ids) == smollm2_tokenizer.decode(ids) == text


def test_chat_template_matches_transformers(tokenizer, smollm2_tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.chat_template and tokenizer.eos_token == smollm2_tokenizer.eos_token
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    kwargs = {"add_generation_prompt": True, "tokenize": False}
    text = tokenizer.apply_chat_template(messages, **kwargs)
    assert text == smollm2_tokenizer.apply_chat_template(messages, **kwargs)
    assert tokenizer.encode(text) == smollm2_tokenizer.encode(text)


# ---------------------------------------------------------------------------- dequantization


def _random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    """Random blocks with finite fp16 scale fields: every bit pattern of the quants is exercised."""
    rng = np.random.default_rng(int(qtype))
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    n = rows * cols // block_elems
    blocks = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    f16_fields = {"Q4_0": [0], "Q8_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2]}
    f16_fields |= {"Q5_K": [0, 2], "Q6_K": [208], "Q3_K": [108], "Q2_K": [80, 82]}
    for start in f16_fields[qtype.name]:
        scale = rng.normal(size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
        blocks[:, start : start + 2] = scale
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q3_K"])
def test_dequantize_matches_gguf_py(qtype: str) -> None:
    t = GGMLQuantizationType[qtype]
    rows, cols = 6, GGML_QUANT_SIZES[t][0] * 3
    blocks = _random_blocks(t, rows, cols)
    ours = dequantize(torch.from_numpy(blocks.reshape(-1).copy()), int(t), (rows, cols))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(np_dequantize(blocks, t)))


def _raw_bytes(checkpoint: GGUFCheckpoint, info: GGUFTensorInfo) -> np.ndarray:
    return np.fromfile(checkpoint.path, np.uint8, count=info.nbytes, offset=info.offset)


@pytest.fixture(scope="module")
def real_weight(checkpoint: GGUFCheckpoint) -> np.ndarray:
    """SmolLM2's layer-0 gate_proj, [1536, 576] float32."""
    info = next(t for t in checkpoint.tensors if t.name == "blk.0.ffn_gate.weight")
    raw = _raw_bytes(checkpoint, info)
    return np_dequantize(raw.reshape(info.shape[0], -1), GGMLQuantizationType(info.ggml_type))


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_real_weights(real_weight: np.ndarray, qtype: str) -> None:
    """A real SmolLM2 weight quantized by gguf-py, read back by both."""
    t = GGMLQuantizationType[qtype]
    weight = torch.from_numpy(real_weight)
    q = np_quantize(real_weight, t)
    ours = dequantize(torch.from_numpy(q.view(np.uint8).reshape(-1).copy()), int(t), weight.shape)
    assert torch.equal(ours.float(), torch.from_numpy(np_dequantize(q, t)))


def test_dequantize_smollm2_tensors_match_gguf_py(checkpoint: GGUFCheckpoint) -> None:
    """The file's own Q4_1, Q8_0 and F32 tensors, before any renaming or permutation."""
    seen = set()
    for info in checkpoint.tensors:
        if info.ggml_type in seen:
            continue
        seen.add(info.ggml_type)
        raw = _raw_bytes(checkpoint, info)
        ours = dequantize(torch.from_numpy(raw.copy()), info.ggml_type, info.shape)
        ref = np_dequantize(raw.reshape(*info.shape[:-1], -1), GGMLQuantizationType(info.ggml_type))
        assert torch.equal(ours.float(), torch.from_numpy(ref)), info.name
    assert seen == {0, 3, 8}  # F32, Q4_1, Q8_0


# ---------------------------------------------------------------------------- other architectures

HIDDEN, INNER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, EXPERTS, VOCAB = 64, 96, 4, 2, 16, 2, 4, 128


def _hf_tensors(arch: str, moe: bool) -> dict[str, torch.Tensor]:
    """Random HF-named weights of a tiny `arch` model (per-expert names, as on the hub)."""
    h, i, q, kv = HIDDEN, INNER, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,)}
    if arch != "qwen3":  # qwen3 keeps the embedding tied
        shapes["lm_head.weight"] = (VOCAB, h)
    for n in range(LAYERS):
        p = f"model.layers.{n}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            shapes[f"{p}.self_attn.{proj}_proj.weight"] = (rows, h)
            if arch in ("qwen2", "llama"):  # llama: exercises the bias un-permutation too
                shapes[f"{p}.self_attn.{proj}_proj.bias"] = (rows,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, q)
        if arch.startswith("qwen3"):
            shapes[f"{p}.self_attn.q_norm.weight"] = (HEAD_DIM,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (HEAD_DIM,)
        if not moe:
            shapes[f"{p}.mlp.gate_proj.weight"] = (i, h)
            shapes[f"{p}.mlp.up_proj.weight"] = (i, h)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, i)
            continue
        block, projs = ("mlp", ("gate_proj", "up_proj", "down_proj"))
        if arch == "llama":
            block, projs = ("block_sparse_moe", ("w1", "w3", "w2"))
        shapes[f"{p}.{block}.gate.weight"] = (EXPERTS, h)
        for e in range(EXPERTS):
            for proj, shape in zip(projs, ((i, h), (i, h), (h, i)), strict=True):
                shapes[f"{p}.{block}.experts.{e}.{proj}.weight"] = shape
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotary halves -> interleaved pairs."""
    w2 = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return w2.swapaxes(1, 2).reshape(w.shape)


def _write_gguf(
    path: Path,
    arch: str,
    hf: dict[str, torch.Tensor],
    qtype: str = "F32",
    eot: int | None = None,
    extra: dict[str, float] | None = None,
    qtypes: dict[str, str] | None = None,
) -> None:
    """Convert as llama.cpp does: gguf-py's name table, stacked experts (stored as `qtype`, or
    `qtypes[proj]` for a projection named there), llama Q/K rows permuted."""
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    name_map = get_tensor_name_map(arch_id, LAYERS)
    w = GGUFWriter(path, arch)
    sizes = {"block_count": LAYERS, "context_length": 256, "embedding_length": HIDDEN}
    sizes |= {"feed_forward_length": INNER, "vocab_size": VOCAB}
    sizes |= {"attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS}
    sizes |= {"attention.key_length": HEAD_DIM, "attention.value_length": HEAD_DIM}
    if any(".experts." in n for n in hf):
        sizes |= {"expert_count": EXPERTS, "expert_used_count": 2}
        sizes |= {"expert_feed_forward_length": INNER}
    for key, value in sizes.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_bos_token_id(5)
    w.add_eos_token_id(7)
    if eot is not None:
        w.add_eot_token_id(eot)
    for key, value in (extra or {}).items():
        w.add_float32(key, value)
    stacked: dict[str, list[torch.Tensor]] = {}
    for name, tensor in hf.items():
        if m := re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", name):
            stacked.setdefault(f"{m[1]}.{m[3]}", []).append(tensor)
            continue
        base, suffix = name.rsplit(".", 1)
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            tensor = _llama_cpp_permute(tensor, HEADS if "q_proj" in base else KV_HEADS)
        w.add_tensor(f"{name_map.get_name(base)}.{suffix}", tensor.numpy())
    for base, experts in stacked.items():
        kind = (qtypes or {}).get(base.rsplit(".", 1)[1], qtype)
        data, t = torch.stack(experts).numpy(), GGMLQuantizationType[kind]  # [E, I, H] / [E, H, I]
        if t != GGMLQuantizationType.F32:
            data = np_quantize(data, t)
        w.add_tensor(f"{name_map.get_name(base)}.weight", data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    ("arch", "moe", "model_type"),
    [("llama", False, "llama"), ("llama", True, "mixtral"), ("qwen2", False, "qwen2"),
     ("qwen3", False, "qwen3"), ("qwen3moe", True, "qwen3_moe")],
)  # fmt: skip
def test_architectures_round_trip(tmp_path: Path, arch: str, moe: bool, model_type: str) -> None:
    hf = _hf_tensors(arch, moe)
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(path, arch, hf)
    ckpt = GGUFCheckpoint(path)
    cfg = ckpt.hf_config()
    assert cfg["model_type"] == model_type and cfg["tie_word_embeddings"] == (arch == "qwen3")
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["num_key_value_heads"]) == (64, 16, 2)
    assert (cfg["rope_theta"], cfg["bos_token_id"], cfg["eos_token_id"]) == (1e6, 5, 7)
    if model_type == "qwen3_moe":
        assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (EXPERTS, 2)
        assert cfg["moe_intermediate_size"] == INNER and cfg["norm_topk_prob"] is True
    if model_type == "mixtral":
        assert cfg["num_local_experts"] == EXPERTS
        assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert ckpt.generation_config() == {"bos_token_id": 5, "eos_token_id": 7}
    ours = dict(ckpt.weights(torch.float32))
    assert ours.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(ours[name], tensor), name


def test_quantized_experts_are_sliced_per_expert(tmp_path: Path) -> None:
    hf = _hf_tensors("qwen3moe", moe=True)
    path = tmp_path / "q8.gguf"
    _write_gguf(path, "qwen3moe", hf, qtype="Q8_0")
    ours = dict(GGUFCheckpoint(path).weights(torch.float32))
    q8 = GGMLQuantizationType.Q8_0
    for e in range(EXPERTS):
        name = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
        expected = np_dequantize(np_quantize(hf[name].numpy(), q8), q8)
        assert torch.equal(ours[name], torch.from_numpy(expected)), name


def test_end_of_turn_token_joins_eos(tmp_path: Path) -> None:
    path = tmp_path / "eot.gguf"
    _write_gguf(path, "qwen3", _hf_tensors("qwen3", moe=False), eot=9)
    assert GGUFCheckpoint(path).generation_config() == {"bos_token_id": 5, "eos_token_id": [7, 9]}


# ---------------------------------------------------------------------------- bad files


def test_is_gguf_file(smollm2_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    assert is_gguf_file(smollm2_gguf)
    assert not is_gguf_file(tmp_path / "x.txt") and not is_gguf_file(tmp_path / "missing.gguf")


@pytest.mark.parametrize("kind", ["random", "truncated_data", "truncated_header", "empty", "text"])
def test_corrupt_files_raise_value_error(smollm2_gguf: Path, tmp_path: Path, kind: str) -> None:
    data = smollm2_gguf.read_bytes()
    content = {
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated_data": data[: len(data) // 2],
        "truncated_header": data[:100_000],
        "empty": b"",
        "text": b"not a model at all\n" * 10,
    }[kind]
    path = tmp_path / f"{kind}.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a valid GGUF file"):
        GGUFCheckpoint(path)


def test_missing_file_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.gguf is not a valid GGUF file"):
        GGUFCheckpoint(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'gpt2'.*supported: llama, qwen2, qwen3, qwen3moe"):
        GGUFCheckpoint(path)


def test_sampling_defaults_come_from_general_sampling_keys(tmp_path: Path) -> None:
    """llama.cpp's general.sampling.* keys are the file's generation defaults (HF's names)."""
    path = tmp_path / "sampling.gguf"
    sampling = {"general.sampling.temp": 0.6, "general.sampling.top_p": 0.95}
    _write_gguf(path, "qwen3", _hf_tensors("qwen3", moe=False), extra=sampling)
    gen = GGUFCheckpoint(path).generation_config()
    assert gen["temperature"] == pytest.approx(0.6) and gen["top_p"] == pytest.approx(0.95)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (5, 7)
