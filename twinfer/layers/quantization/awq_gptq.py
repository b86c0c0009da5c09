"""AutoAWQ (GEMM) and GPTQ checkpoints: integer weights with group scales and zero points, read
as compressed-tensors' pack-quantized layout, losslessly, one tensor at a time while loading.

Both store W = (q - z) * s per output row and group of g input columns, like compressed-tensors,
only packed otherwise (see ../shared/reference/models-and-formats.md §11.3-11.4):
- AutoAWQ: `qweight` int32 [K, N/8] packed along the *output* dim, nibble k of word w holding
  column 8w + AWQ_ORDER[k]; `qzeros` int32 [K/g, N/8] the same way; `scales` [K/g, N]. Always
  asymmetric, 4-bit.
- GPTQ: `qweight` int32 [K*b/32, N] packed along the *input* dim (element i at bits b*(i % pw));
  `qzeros` int32 [G, N*b/32] packed along the output dim; `scales` [G, N]; `g_idx` [K] the group
  of each input column (act-order, `desc_act`). Format v1 (`checkpoint_format: gptq`) stores z - 1.

So a GPTQ `qweight` transposed is compressed-tensors' `weight_packed`, its `qzeros` transposed is
`weight_zero_point`; AWQ's words are unpacked, reordered and packed along the input dim. Every
layer then runs as a compressed-tensors one (compressed_tensors.py: kernels, MoE, the CPU engine).

Legend: `K` input features, `N` output features, `g` group size, `G` = K / g groups, `b` bits,
`pw` = 32 / b values a word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from twinfer.layers.quantization.compressed_tensors import (
    CompressedTensorsConfig,
    IntWeightScheme,
    pack_int32,
)

# Nibble k of an AWQ word holds column 8w + AWQ_ORDER[k] of its 8 (AutoAWQ's GEMM pack order).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Linear layers these formats leave in the model dtype: the LM head and the MoE routers.
_ALWAYS_PLAIN = ["lm_head", r"re:.*\.mlp\.gate$", r"re:.*shared_expert_gate$"]
_SUFFIX = re.compile(r"^(.*)\.(qweight|qzeros|scales|g_idx)$")


def unpack_columns(packed: Tensor, bits: int, count: int, order: tuple[int, ...] | None) -> Tensor:
    """int32 [R, W] -> unsigned values [R, count] (int16): value k of word w at bits b*k is
    column pw*w + order[k] (`order` None: column pw*w + k)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, pw]
    if order is not None:
        values = values[..., torch.argsort(torch.tensor(order))]
    return values.reshape(packed.shape[0], -1)[:, :count].to(torch.int16)


class _RepackedIntConfig(CompressedTensorsConfig):
    """A pack-quantized compressed-tensors config whose checkpoint tensors arrive in another
    packing (`convert`)."""

    bits: int
    format_version: str

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, Tensor]]
    ) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in weights:
            match = _SUFFIX.match(name)
            if match is None:
                yield name, tensor
                continue
            converted = self.convert(match[2], tensor)
            if converted is not None:
                yield f"{match[1]}.{converted[0]}", converted[1]

    def convert(self, kind: str, tensor: Tensor) -> tuple[str, Tensor] | None:
        """(compressed-tensors suffix, tensor) for a checkpoint `qweight`/`qzeros`/`scales`/
        `g_idx`, or None to drop it."""
        raise NotImplementedError

    def _scheme(self) -> IntWeightScheme:
        return self.groups[0][1]


class AwqConfig(_RepackedIntConfig):
    name = "awq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AwqConfig:
        bits = config.get("bits", config.get("w_bit", 4))
        version = str(config.get("version", "gemm")).lower()
        group = config.get("group_size", config.get("q_group_size", 128))
        if bits != 4 or version != "gemm":
            raise ValueError(
                f"AWQ checkpoint with {bits}-bit weights, version {version!r}: twinfer loads "
                "AutoAWQ's 4-bit GEMM format (version gemm)."
            )
        if not config.get("zero_point", True):
            raise ValueError(
                "AWQ checkpoint without zero points (zero_point false) is not loaded; AutoAWQ's "
                "GEMM format with zero points is."
            )
        if not isinstance(group, int) or group < 1:
            raise ValueError(f"AWQ group_size must be a positive int, got {group!r}.")
        scheme = IntWeightScheme(4, group, symmetric=False)
        # NOTE: AutoAWQ (and vLLM) skip a module when an entry is a substring of its name.
        skip = [f"re:.*{re.escape(str(m))}" for m in config.get("modules_to_not_convert") or []]
        return cls([(["Linear"], scheme)], _ALWAYS_PLAIN + skip)

    def convert(self, kind: str, tensor: Tensor) -> tuple[str, Tensor] | None:
        if kind == "scales":  # [G, N] -> [N, G]
            return "weight_scale", tensor.t().contiguous()
        if kind == "g_idx":
            return None
        # qweight [K, N/8] -> q [N, K]; qzeros [G, N/8] -> z [G, N], packed along N again.
        values = unpack_columns(tensor, 4, tensor.shape[1] * 8, AWQ_ORDER) - 8
        if kind == "qweight":
            return "weight_packed", pack_int32(values.t(), 4)
        return "weight_zero_point", pack_int32(values, 4).t().contiguous()

    def describe(self) -> str:
        return f"awq (AutoAWQ GEMM int4 g{self._scheme().group_size}, zero points)"


class GptqConfig(_RepackedIntConfig):
    name = "gptq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GptqConfig:
        bits, group = config.get("bits", 4), config.get("group_size", 128)
        if bits not in (4, 8):
            raise ValueError(f"GPTQ checkpoint with {bits}-bit weights: twinfer loads 4 and 8.")
        if not isinstance(group, int) or (group < 1 and group != -1):
            raise ValueError(f"GPTQ group_size must be a positive int or -1, got {group!r}.")
        version = str(config.get("checkpoint_format", "gptq")).lower()
        if version not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"GPTQ checkpoint_format {version!r} is not loaded; gptq and gptq_v2 are "
                "(other packings, e.g. marlin, are made for one GPU kernel)."
            )
        scheme = IntWeightScheme(
            bits,
            None if group == -1 else group,
            symmetric=bool(config.get("sym", True)),
            g_idx=bool(config.get("desc_act", False)),
        )
        # gptqmodel's `dynamic`: "-:<regex>" leaves the matching modules unquantized.
        skip = [f"re:{key[2:]}" for key in config.get("dynamic") or {} if key.startswith("-:")]
        plain = [e for e in _ALWAYS_PLAIN if e != "lm_head" or not config.get("lm_head", False)]
        out = cls([(["Linear"], scheme)], plain + skip)
        out.format_version = version
        return out

    def convert(self, kind: str, tensor: Tensor) -> tuple[str, Tensor] | None:
        scheme = self._scheme()
        if kind == "qweight":  # [K/pw, N] packed along K: transposed, compressed-tensors'
            return "weight_packed", tensor.t().contiguous()
        if kind == "scales":
            return "weight_scale", tensor.t().contiguous()
        if kind == "g_idx":
            return ("weight_g_idx", tensor) if scheme.g_idx else None
        if scheme.symmetric:  # z = 2^(b-1) for every group: nothing to keep
            return None
        if self.format_version == "gptq":  # v1 stores z - 1
            bits = scheme.num_bits
            z = unpack_columns(tensor, bits, tensor.shape[1] * 32 // bits, None) + 1
            if int(z.max()) >= 1 << bits:
                raise ValueError(
                    f"a GPTQ v1 zero point overflows {bits} bits (a stored -1); re-export the "
                    "checkpoint as gptq_v2."
                )
            tensor = pack_int32(z - (1 << (bits - 1)), bits)
        return "weight_zero_point", tensor.t().contiguous()

    def describe(self) -> str:
        s = self._scheme()
        group = "channel" if s.group_size is None else f"g{s.group_size}"
        kind = "sym" if s.symmetric else "zero points"
        order = ", act-order" if s.g_idx else ""
        return f"gptq ({self.format_version}, int{s.num_bits} {group}, {kind}{order})"
