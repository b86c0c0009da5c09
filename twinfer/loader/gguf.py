"""Memory-mapped reading of llama.cpp GGUF checkpoints: config, tokenizer and weights in HF form.

The header is parsed here (gguf.GGUFReader takes ~4 s on a 49k-token vocabulary because it builds
one numpy array per string); tensors are zero-copy views of the map, dequantized in torch one at a
time (one expert at a time for stacked MoE tensors) while `weights()` is iterated.

Shape legend: `N` quant blocks, `E` experts, `I` expert inner size, `H` hidden size.
"""

from __future__ import annotations

import logging
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_FIX = "re-download it or convert it again with llama.cpp's convert_hf_to_gguf.py"

# general.architecture -> (HF model_type, HF architectures[0]); llama with experts is Mixtral.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}

# "{arch}.<key>" -> HF config key, as transformers.integrations.ggml.GGUF_CONFIG_MAPPING names them.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")

# GGUF tensor name -> HF parameter name (llama.cpp's gguf-py tensor_mapping, inverted).
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# model_type -> (router, experts prefix, per-expert names of the gate, up and down projections)
_MOE_NAMES = {
    "qwen3_moe": ("mlp.gate", "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts", ("w1", "w3", "w2")),
}
_PROJS = ("gate", "up", "down")
# blk.N.<kind>[.E].weight|bias; E: one tensor per expert (older Mixtral GGUFs)
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)")
_EXPS_RE = re.compile(r"ffn_(gate|up|down)_exps")
# NOTE: rope_freqs (Llama 3.1 rope factors) is no HF parameter; HF derives it from rope_scaling.
_IGNORED_TENSORS = {"rope_freqs.weight"}
_PERMUTED = (".q_proj.weight", ".q_proj.bias", ".k_proj.weight", ".k_proj.bias")

# GGUF metadata value types with a fixed size -> struct format; 8 = string, 9 = array.
_SCALAR_FMT = dict(zip((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12), "BbHhIif?Qqd", strict=True))
# Vocabularies and merges: walked over in the header, read by the tokenizer only.
_LONG_STRING_ARRAY = 1024


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


# llama.cpp's sampling defaults in a GGUF -> generation_config.json's names.
_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists dimensions innermost first)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


# ---------------------------------------------------------------------------- dequantization


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of each block, as float32: [N, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n] uint8: low nibbles, then high nibbles (ggml's order)."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _nibbles_f32(qs: torch.Tensor) -> torch.Tensor:
    """As `_nibbles`, written straight into float32 (no uint8 intermediate)."""
    out = torch.empty(*qs.shape[:-1], 2, qs.shape[-1])
    out.select(-2, 0).copy_(qs & 0x0F)
    out.select(-2, 1).copy_(qs >> 4)
    return out


# NOTE: in-place ops below skip a fresh float32 buffer per op (~30% faster); the arithmetic and its
# order are gguf-py's, so results are bit-identical to gguf.quants.dequantize.
def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _nibbles_f32(b[:, 2:]).view(-1, 32).sub_(8).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles_f32(b[:, 4:]).view(-1, 32).mul_(_f16(b, 0)).add_(_f16(b, 2))


_Q4_0, _Q4_1, _Q4_K = 2, 3, 12  # ggml type ids
_Q4_TYPES = (_Q4_0, _Q4_1, _Q4_K)
_DOWN_NAMES = (".down_proj.weight", ".w2.weight")  # an expert's down projection, HF names


def q4_grid(raw: torch.Tensor, ggml_type: int, shape: tuple[int, int]):
    """A Q4_0 / Q4_1 / Q4_K matrix as its int4 grid in groups of 32, or None for other types.

    Returns (q [N, K] uint8 in 0..15, scale [N, K/32], zero [N, K/32]) float32 with
    value = (q - 8) * scale + zero: Q4_1's d * q + m is scale d, zero m + 8d; Q4_0's d * (q - 8)
    is scale d, zero 0; Q4_K's sub-block j of 32, d * sc_j * q - dmin * m_j, is scale d * sc_j,
    zero 8 * scale - dmin * m_j (the same q; the zero rounds once more in float32).
    """
    n, k = shape
    if ggml_type == _Q4_K:
        b = raw.reshape(-1, 144)
        scale, minimum = _k_scales(b)  # [N/256 blocks, 8, 1] each
        q = _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(n, k)
        scale = scale.reshape(n, k // 32)
        return q, scale, 8 * scale - minimum.reshape(n, k // 32)
    if ggml_type == _Q4_0:
        b = raw.reshape(-1, 18)
        d = _f16(b, 0)
        zero = torch.zeros_like(d)
        qs = b[:, 2:]
    elif ggml_type == _Q4_1:
        b = raw.reshape(-1, 20)
        d = _f16(b, 0)
        zero = _f16(b, 2) + 8 * d
        qs = b[:, 4:]
    else:
        return None
    q = _nibbles(qs).reshape(n, k)  # low nibbles are elements 0..15 of a block, high 16..31
    return q, d.reshape(n, k // 32), zero.reshape(n, k // 32)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: eight 6-bit (scale, min) pairs packed in bytes 4..16, each [N, 8, 1]."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1).float()
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1).float()
    return (_f16(b, 0) * sc).unsqueeze(-1), (_f16(b, 2) * mn).unsqueeze(-1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dm = _k_scales(b)
    q = _nibbles_f32(b[:, 16:].reshape(-1, 4, 32)).view(-1, 8, 32)
    return q.mul_(d).sub_(dm).view(-1, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dm = _k_scales(b)
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    qh = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1  # [N, 8, 32]: bit j of 32-element group j
    ql = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return (ql | (qh << 4)).float().mul_(d).sub_(dm).view(-1, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).unsqueeze(-1)  # [N, 16, 1]
    ql = _nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    q = (ql | (qh << 4)).view(-1, 16, 16).float().sub_(32)
    return q.mul_(d).view(-1, 256)


_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
# ggml type -> (elements per block, bytes per block, torch dequantizer)
_BLOCK_DEQUANT: dict[int, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    2: (32, 18, _q4_0),
    3: (32, 20, _q4_1),
    8: (32, 34, _q8_0),
    12: (256, 144, _q4_k),
    13: (256, 176, _q5_k),
    14: (256, 210, _q6_k),
}


def _type_size(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type, or ValueError if unknown."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml tensor type {ggml_type}") from None


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF bytes (uint8) -> tensor of `shape`: float32 for quantized types, the stored dtype
    for F32/F16/BF16 (a zero-copy view)."""
    if ggml_type in _FLOAT_TYPES:
        return raw.view(_FLOAT_TYPES[ggml_type]).reshape(shape)
    if ggml_type in _BLOCK_DEQUANT:
        _, block_bytes, fn = _BLOCK_DEQUANT[ggml_type]
        return fn(raw.reshape(-1, block_bytes)).reshape(shape)
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as np_dequantize

    # NOTE: the numpy fallback (IQ*, Q2_K, Q3_K, Q5_0, ...) is correct but ~10x slower.
    out = np_dequantize(raw.numpy(), GGMLQuantizationType(ggml_type))
    return torch.from_numpy(out).reshape(shape)


# ---------------------------------------------------------------------------- header parsing


class _Header:
    """A cursor over the mapped file; every read is bounds-checked (corrupt files raise)."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string at byte {self.pos} runs past the end of the file")
        self.pos += n
        return self.buf[self.pos - n : self.pos].decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FMT:
            return self.scalar(_SCALAR_FMT[value_type])
        if value_type == 8:
            return self.string()
        if value_type != 9:
            raise ValueError(f"unknown metadata value type {value_type} at byte {self.pos}")
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type in _SCALAR_FMT:
            fmt = f"<{count}{_SCALAR_FMT[item_type]}"
            values = list(struct.unpack_from(fmt, self.buf, self.pos))
            self.pos += struct.calcsize(fmt)
            return values
        if item_type == 8 and count > _LONG_STRING_ARRAY:
            for _ in range(count):  # walk the lengths without decoding (~30 ms for 50k strings)
                self.pos += 8 + self.scalar("Q")
            return _SkippedStrings(count)
        if count > len(self.buf):
            raise ValueError(f"an array at byte {self.pos} claims {count} items")
        return [self.value(item_type) for _ in range(count)]


@dataclass(frozen=True, slots=True)
class _SkippedStrings:
    """A long string array (vocabulary, merges) left unread; only its length is kept."""

    count: int


def _parse(buf: mmap.mmap) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    if len(buf) < 24 or buf[:4] != GGUF_MAGIC:
        raise ValueError("it does not start with the GGUF magic bytes")
    h = _Header(buf)
    h.pos = 4
    version, n_tensors, n_kv = h.scalar("I"), h.scalar("Q"), h.scalar("Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; twinfer reads versions 2 and 3")
    if n_tensors > len(buf) // 24 or n_kv > len(buf) // 12:
        raise ValueError(f"header claims {n_tensors} tensors and {n_kv} metadata entries")
    metadata = {}
    for _ in range(n_kv):
        key = h.string()
        metadata[key] = h.value(h.scalar("I"))
    entries = []
    for _ in range(n_tensors):
        name, n_dims = h.string(), h.scalar("I")
        if not 1 <= n_dims <= 4:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = [h.scalar("Q") for _ in range(n_dims)]
        entries.append((name, tuple(reversed(dims)), h.scalar("I"), h.scalar("Q")))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"general.alignment is {alignment!r}")
    data_start = (h.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, ggml_type, offset in entries:
        block_elems, block_bytes = _type_size(ggml_type)
        if shape[-1] % block_elems:
            raise ValueError(f"tensor {name} has rows of {shape[-1]}, not whole blocks")
        numel = 1
        for d in shape:
            numel *= d
        info = GGUFTensorInfo(
            name, shape, ggml_type, data_start + offset, numel // block_elems * block_bytes
        )
        if info.offset + info.nbytes > len(buf):
            raise ValueError(
                f"truncated: tensor {name} ends at byte {info.offset + info.nbytes} but the file "
                f"has {len(buf)} bytes"
            )
        tensors.append(info)
    return metadata, tensors


# ---------------------------------------------------------------------------- the checkpoint


class GGUFCheckpoint:
    """An opened (memory-mapped) GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, 2) == 0:
                    raise ValueError("the file is empty")
                # NOTE: copy-on-write, so torch gets writable zero-copy views and the file is safe.
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.metadata, self.tensors = _parse(self._buf)
        except (OSError, ValueError, struct.error, UnicodeDecodeError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            if isinstance(exc, struct.error):
                reason = f"truncated or corrupt header; the file has {len(self._buf)} bytes"
            raise ValueError(f"{self.path} is not a valid GGUF file ({reason}); {_FIX}") from exc
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{self.path} holds a GGUF model of architecture {self.architecture!r}, which "
                f"twinfer does not support; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self._names = {t.name for t in self.tensors}
        # Named up front so that a tensor twinfer cannot place fails at open, not mid-load.
        self._hf_names = {
            t.name: self._hf_name(t) for t in self.tensors if t.name not in _IGNORED_TENSORS
        }

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def model_type(self) -> str:
        model_type = SUPPORTED_ARCHITECTURES[self.architecture][0]
        # llama.cpp writes Mixtral as llama with stacked expert tensors.
        if model_type == "llama" and self._arch("expert_count", 0) > 0:
            return "mixtral"
        return model_type

    def hf_config(self) -> dict:
        """A Hugging Face config.json-shaped dict (keys as transformers' GGUF loader names them)."""
        model_type = self.model_type
        arch_name = "MixtralForCausalLM" if model_type == "mixtral" else None
        cfg: dict[str, Any] = {
            "architectures": [arch_name or SUPPORTED_ARCHITECTURES[self.architecture][1]],
            "model_type": model_type,
        }
        for key, hf_key in _CONFIG_KEYS.items():
            if (value := self._arch(key)) is not None:
                cfg[hf_key] = value
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads")
        if missing := [k for k in required if k not in cfg]:
            raise ValueError(f"{self.path} lacks metadata for {', '.join(missing)}; {_FIX}")
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        head_dim = self._arch("attention.key_length")
        if head_dim is None and self.architecture == "llama":
            head_dim = self._arch("rope.dimension_count")  # as transformers reads llama files
        cfg["head_dim"] = head_dim or cfg["hidden_size"] // cfg["num_attention_heads"]
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if "vocab_size" not in cfg and tokens is not None:
            cfg["vocab_size"] = tokens.count if isinstance(tokens, _SkippedStrings) else len(tokens)
        if model_type == "mixtral":
            cfg["num_local_experts"] = cfg.pop("num_experts")
            cfg.pop("moe_intermediate_size", None)
        if model_type == "qwen3_moe":
            cfg["norm_topk_prob"] = True  # NOTE: llama.cpp always renormalizes the top-k weights
        if self.architecture == "llama" and "blk.0.attn_q.bias" in self._names:
            cfg["attention_bias"] = True
        scaling = self._arch("rope.scaling.type")
        if scaling not in (None, "none"):
            factor = self._arch("rope.scaling.factor")
            cfg["rope_scaling"] = {"rope_type": scaling, "factor": factor}
            if (orig := self._arch("rope.scaling.original_context_length")) is not None:
                cfg["rope_scaling"]["original_max_position_embeddings"] = orig
        if "rope_freqs.weight" in self._names:
            logger.warning(
                "%s carries Llama 3 rope frequency factors (rope_freqs.weight), which twinfer does "
                "not apply yet; use the safetensors checkpoint for exact Llama 3.1+ outputs",
                self.path,
            )
        cfg["tie_word_embeddings"] = "output.weight" not in self._names
        for key in _TOKEN_IDS:
            if (value := self.metadata.get(f"tokenizer.ggml.{key}")) is not None:
                cfg[key.replace("unknown", "unk").replace("padding", "pad")] = value
        return cfg

    def generation_config(self) -> dict:
        """generation_config.json's keys from the file, where present: bos/eos_token_id from the
        tokenizer.ggml.* fields, sampling defaults from general.sampling.* (llama.cpp's names).

        eos_token_id is an int, or a list when the file also names a different end-of-turn
        (eot) or end-of-message (eom) token, as HF generation_config.json lists them.
        """
        meta = self.metadata
        out = {
            hf_name: meta[key]
            for key, hf_name in _SAMPLING_KEYS.items()
            if meta.get(key) is not None
        }
        if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
            out["bos_token_id"] = bos
        ids = [
            meta.get(f"tokenizer.ggml.{k}")
            for k in ("eos_token_id", "eot_token_id", "eom_token_id")
        ]
        eos = list(dict.fromkeys(i for i in ids if i is not None))
        if eos:
            out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return out

    def tokenizer(self) -> Any:
        """A transformers PreTrainedTokenizerFast from the GGUF metadata, with its chat template."""
        try:  # transformers >= 5: build it directly (~1 s; AutoTokenizer takes ~7 s on SmolLM2)
            from transformers import PreTrainedTokenizerFast
            from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
        except ImportError:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        else:
            architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(self.path))
            backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
            tok = PreTrainedTokenizerFast(
                tokenizer_object=backend, name_or_path=str(self.path), **tokenizer_config, **extra
            )
        if template := self.metadata.get("tokenizer.chat_template"):
            tok.chat_template = template
        return tok

    def q4_expert_parts(self) -> set[tuple[int, str]]:
        """(layer, "w13" | "w2") of the stacked expert matrices stored as Q4_0 / Q4_1 / Q4_K
        (w13: gate and up both), which `weights(expert_grids=True)` yields as int4 grids."""
        kinds: dict[int, set[str]] = {}
        for info in self.tensors:
            m = _BLOCK_RE.fullmatch(info.name)
            exps = _EXPS_RE.fullmatch(m[2]) if m else None
            if exps and len(info.shape) == 3 and info.ggml_type in _Q4_TYPES:
                kinds.setdefault(int(m[1]), set()).add(exps[1])
        parts = set()
        for layer, found in kinds.items():
            if {"gate", "up"} <= found:
                parts.add((layer, "w13"))
            if "down" in found:
                parts.add((layer, "w2"))
        return parts

    def q4_dense_modules(self) -> set[str]:
        """HF names of the modules (e.g. model.layers.0.self_attn.q_proj) whose weight matrix is
        stored as Q4_0 / Q4_1 / Q4_K."""
        return {
            name.removesuffix(".weight")
            for info in self.tensors
            if (name := self._hf_names.get(info.name))
            and "{e}" not in name
            and len(info.shape) == 2
            and info.ggml_type in _Q4_TYPES
        }

    def weights(
        self,
        dtype: torch.dtype,
        expert_grids: bool = False,
        dense_grids: frozenset[str] = frozenset(),
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in `dtype`, [out, in]) per parameter, dequantized lazily one at a time.

        Tensors already in `dtype` may be zero-copy (copy-on-write) views of the mapped file.
        Q4 matrices can come as their int4 grid (`q4_grid`) instead: `<module>.grid_q` (uint8
        [out, in]), `.grid_scale` and `.grid_zero` (float32 [out, in/32]); `expert_grids`: the
        `q4_expert_parts` (per expert), `dense_grids`: these modules' weights.
        """
        grids = self.q4_expert_parts() if expert_grids else set()
        for info in self.tensors:
            name = self._hf_names.get(info.name)
            if name is None:
                continue
            raw = torch.frombuffer(
                self._buf, dtype=torch.uint8, count=info.nbytes, offset=info.offset
            )
            if "{e}" in name:  # stacked experts [E, I, H] / [E, H, I]: one expert at a time
                per_expert = info.nbytes // info.shape[0]
                layer = int(_BLOCK_RE.fullmatch(info.name)[1])
                grid = (layer, "w2" if name.endswith(_DOWN_NAMES) else "w13") in grids
                for e in range(info.shape[0]):
                    w = raw[e * per_expert : (e + 1) * per_expert]
                    if grid:
                        base = name.format(e=e).removesuffix(".weight")
                        q, scale, zero = q4_grid(w, info.ggml_type, info.shape[1:])
                        yield f"{base}.grid_q", q
                        yield f"{base}.grid_scale", scale
                        yield f"{base}.grid_zero", zero
                    else:
                        yield (
                            name.format(e=e),
                            dequantize(w, info.ggml_type, info.shape[1:]).to(dtype),
                        )
                continue
            module = name.removesuffix(".weight")
            if module in dense_grids:  # rows in HF order, as the dequantized weight
                grid = q4_grid(raw, info.ggml_type, info.shape)
                if self.architecture == "llama" and name.endswith(_PERMUTED):
                    grid = tuple(self._unpermute(t, name) for t in grid)
                yield from zip(
                    (f"{module}.grid_{k}" for k in ("q", "scale", "zero")), grid, strict=True
                )
                continue
            tensor = dequantize(raw, info.ggml_type, info.shape)
            if self.architecture == "llama" and name.endswith(_PERMUTED):
                tensor = self._unpermute(tensor, name)
            yield name, tensor.to(dtype)

    def _hf_name(self, info: GGUFTensorInfo) -> str:
        """The HF name of a GGUF tensor; "{e}" stands for the expert of a stacked MoE tensor."""
        moe = _MOE_NAMES.get(self.model_type)
        base, _, suffix = info.name.rpartition(".")
        if base in _TOP_NAMES:
            return f"{_TOP_NAMES[base]}.{suffix}"
        if m := _BLOCK_RE.fullmatch(info.name):
            layer, kind, expert, suffix = m.groups()
            prefix = f"model.layers.{layer}"
            if expert is None and kind in _BLOCK_NAMES:
                return f"{prefix}.{_BLOCK_NAMES[kind]}.{suffix}"
            if moe and expert is None and kind == "ffn_gate_inp":
                return f"{prefix}.{moe[0]}.{suffix}"
            if moe and (exps := _EXPS_RE.fullmatch(kind)) and len(info.shape) == 3:
                return f"{prefix}.{moe[1]}.{{e}}.{moe[2][_PROJS.index(exps[1])]}.{suffix}"
            if moe and expert is not None and kind in ("ffn_gate", "ffn_up", "ffn_down"):
                return f"{prefix}.{moe[1]}.{expert}.{moe[2][_PROJS.index(kind[4:])]}.{suffix}"
        raise ValueError(
            f"{self.path} holds tensor {info.name!r} {list(info.shape)}, which twinfer does not "
            f"know for architecture {self.architecture!r}; convert the model again with a "
            "current llama.cpp, or load its safetensors checkpoint instead"
        )

    def _unpermute(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """Undo llama.cpp's Q/K row permutation (its rotary pairs interleave, HF's are halves)."""
        n_head = self._arch("attention.head_count")
        if ".k_proj." in name:
            n_head = self._arch("attention.head_count_kv", n_head)
        dim = w.shape[0] // n_head // 2
        return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
