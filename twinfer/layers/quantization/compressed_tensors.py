"""compressed-tensors `pack-quantized` integer weights (W4A16 / W8A16): Kimi-K2.5, and every
community "AWQ 4bit" release made with llm-compressor (group 32, symmetric).

Per linear layer: `weight_packed` int32 [N, ceil(K*b/32)] (values offset-binary q + 2^(b-1),
element i at bit i*b of its row), `weight_scale` [N, K/g] (g the group size; 1 group for the
channel strategy), `weight_zero_point` int32 packed along N [ceil(N*b/32), K/g] when asymmetric,
and `weight_shape` [2] (redundant with config.json; not read). W = (q - zero_point) * scale.

Legend: `T` tokens, `N` output features, `K` input features, `b` bits, `g` group size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from twinfer.layers.quantization.base import (
    LinearMethod,
    MoEMethod,
    QuantizationConfig,
    fused_names,
    module_matches,
    quant_param,
)
from twinfer.layers.quantization.cpu_kernels import INT4_GROUP, int4_linear, pack_int4
from twinfer.layers.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase
    from twinfer.layers.moe.layer import MoELayer

_FORMATS = ("pack-quantized",)


@dataclass(frozen=True, slots=True)
class IntWeightScheme:
    num_bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], IntWeightScheme]], ignore: list[str]) -> None:
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        groups = []
        for name, group in (config.get("config_groups") or {}).items():
            fmt = group.get("format") or config.get("format")
            if fmt not in _FORMATS:
                raise ValueError(
                    f"compressed-tensors format {fmt!r} (config group {name}) is not loaded yet; "
                    f"supported: {', '.join(_FORMATS)} (W4A16/W8A16 integer weights)."
                )
            if group.get("input_activations") is not None:
                raise ValueError(
                    f"compressed-tensors config group {name} quantizes activations too; twinfer "
                    "loads weight-only schemes (W4A16, W8A16)."
                )
            groups.append((list(group.get("targets") or []), _scheme(name, group.get("weights"))))
        if not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups.")
        return cls(groups, [str(entry) for entry in config.get("ignore") or []])

    def linear_method(self, prefix: str) -> LinearMethod:
        names = fused_names(prefix)
        schemes = {self._scheme_of(name) for name in names}
        if len(schemes) > 1:
            raise ValueError(
                f"{prefix}: the checkpoint stores {', '.join(names)} in different formats; "
                "twinfer fuses them into one layer, which needs one format."
            )
        scheme = schemes.pop()
        return UnquantizedLinearMethod() if scheme is None else PackedIntLinearMethod(scheme)

    def moe_int4_group(self) -> int | None:
        groups = {s.group_size if _engine_keeps(s) else None for _, s in self.groups}
        return groups.pop() if len(groups) == 1 else None

    def moe_method(self, prefix: str, gate_proj: str = "gate_proj") -> MoEMethod | None:
        # The checkpoints store per-expert Linear modules: expert 0's gate stands for them all.
        scheme = self._scheme_of(f"{prefix}.experts.0.{gate_proj}")
        return None if scheme is None else PackedIntMoEMethod(scheme)

    def _scheme_of(self, name: str) -> IntWeightScheme | None:
        if any(module_matches(name, entry) for entry in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(target == "Linear" or module_matches(name, target) for target in targets):
                return scheme
        return None

    def describe(self) -> str:
        kinds = sorted(
            {
                f"int{s.num_bits} {'channel' if s.group_size is None else f'g{s.group_size}'}"
                f"{'' if s.symmetric else ' asym'}"
                for _, s in self.groups
            }
        )
        return f"compressed-tensors pack-quantized ({', '.join(kinds)})"


def _scheme(name: str, weights: dict[str, Any] | None) -> IntWeightScheme:
    if not weights:
        raise ValueError(f"compressed-tensors config group {name} has no weights scheme.")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if kind != "int" or bits not in (4, 8):
        raise ValueError(
            f"compressed-tensors config group {name}: {kind} {bits}-bit weights are not "
            "supported by pack-quantized loading; int4 and int8 are."
        )
    if weights.get("actorder") not in (None, "static", "weight"):  # "weight": no g_idx stored
        raise ValueError(
            f"compressed-tensors config group {name} uses actorder {weights['actorder']!r} "
            "(a g_idx permutation), which twinfer does not load yet."
        )
    if strategy == "channel":
        return IntWeightScheme(bits, None, bool(weights.get("symmetric", True)))
    group = weights.get("group_size")
    if strategy != "group" or not isinstance(group, int) or group < 1:
        raise ValueError(
            f"compressed-tensors config group {name}: strategy {strategy!r} with group_size "
            f"{group!r}; twinfer loads the group (with a positive group_size) and channel ones."
        )
    return IntWeightScheme(bits, group, bool(weights.get("symmetric", True)))


def _engine_keeps(scheme: IntWeightScheme) -> bool:
    """The CPU engine's int4 layout: symmetric groups of 32, 64 or 128 (no zero points)."""
    return scheme.num_bits == 4 and scheme.symmetric and scheme.group_size in (32, 64, 128)


class PackedIntLinearMethod(LinearMethod):
    """Keeps the packed integers. On the CPU, int4 with bf16/fp16 activations runs torch's int4
    kernel on the same grid (groups of 64/128 repeat their scale per 32: lossless); elsewhere
    each call dequantizes (the reference path)."""

    def __init__(self, scheme: IntWeightScheme) -> None:
        self.scheme = scheme

    def create_weights(self, layer: LinearBase) -> None:
        n, k, bits = layer.output_size_local, layer.input_size_local, self.scheme.num_bits
        group = self.scheme.group_size or k
        if k % group:
            raise ValueError(
                f"{layer.prefix}: input size {k} is not a multiple of the checkpoint's group "
                f"size {group}."
            )
        per_word = 32 // bits
        layer.weight_packed = quant_param(
            torch.empty(n, -(-k // per_word), dtype=torch.int32), layer
        )
        layer.weight_packed.block_size = (1, per_word)
        layer.weight_scale = quant_param(torch.empty(n, k // group, dtype=torch.float32), layer)
        layer.weight_scale.block_size = (1, group)
        if not self.scheme.symmetric:
            zp = torch.empty(-(-n // per_word), k // group, dtype=torch.int32)
            layer.weight_zero_point = quant_param(zp, layer)
            layer.weight_zero_point.block_size = (per_word, group)
        layer.quant_dtype = torch.get_default_dtype()  # the model dtype the layer computes in

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if not self._uses_int4_kernel(layer):
            return
        q, zero_point = self.integers(layer)  # q [N, K] and zero points [N, K/g], signed
        group = self.scheme.group_size or q.shape[1]
        repeat = group // INT4_GROUP
        scale = layer.weight_scale.repeat_interleave(repeat, 1)  # [N, K/32]
        # W = (q - zp) s = (q_unsigned - 8) s + (-zp s): the int4 kernel's (q - 8) * s + zero.
        zero = -(zero_point.repeat_interleave(repeat, 1).float() * scale)
        layer.int4_weight = pack_int4(q.to(torch.int32) + 8, scale, zero, layer.quant_dtype)
        for name in ("weight_packed", "weight_scale", "weight_zero_point"):
            if hasattr(layer, name):
                getattr(layer, name).data = getattr(layer, name).data.new_empty(0)

    def _uses_int4_kernel(self, layer: LinearBase) -> bool:
        group = self.scheme.group_size or layer.input_size_local
        return (
            layer.weight_packed.device.type == "cpu"
            and self.scheme.num_bits == 4
            and group % INT4_GROUP == 0
            and layer.output_size_local % 16 == 0  # the kernel packs rows in 16s
            and layer.quant_dtype in (torch.bfloat16, torch.float16)
        )

    def integers(self, layer: LinearBase) -> tuple[Tensor, Tensor]:
        """(q [N, K], zero points [N, K/g]) as signed ints (int8), unpacked."""
        zero_point = getattr(layer, "weight_zero_point", None)
        return unpack_weights(
            self.scheme, layer.weight_packed, layer.weight_scale, zero_point, layer.input_size_local
        )

    def apply(self, layer: LinearBase, x: Tensor, bias: Tensor | None) -> Tensor:
        if layer.int4_weight is not None:
            return int4_linear(x, layer.int4_weight, bias)
        q, zero_point = self.integers(layer)
        return F.linear(x, dequantize_ints(q, zero_point, layer.weight_scale, x.dtype), bias)


class PackedIntMoEMethod(MoEMethod):
    """Routed experts as packed integers: `w13_weight_packed` [E, 2I, H/pw], `w2_weight_packed`
    [E, H, I/pw] (pw = 32/b values a word), their group scales, and (asymmetric) zero points
    packed along the rows; w13's rows are the gate's, then the up projection's."""

    def __init__(self, scheme: IntWeightScheme) -> None:
        self.scheme = scheme

    def param_names(self) -> tuple[str, ...]:
        names = ("weight_packed", "weight_scale")
        if not self.scheme.symmetric:
            names += ("weight_zero_point",)
        return tuple(f"{w}_{name}" for w in ("w13", "w2") for name in names)

    def int4_group_scales(self, layer: MoELayer, group: int) -> tuple[Tensor, Tensor] | None:
        if not _engine_keeps(self.scheme) or self.scheme.group_size != group:
            return None
        return layer.w13_weight_scale.data.contiguous(), layer.w2_weight_scale.data.contiguous()

    def create_weights(self, layer: MoELayer) -> None:
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size_local
        pw = 32 // self.scheme.num_bits
        for w, rows, cols, halves in (("w13", i, h, 2), ("w2", h, i, 1)):
            group = self.scheme.group_size or cols
            if cols % group:
                raise ValueError(
                    f"{layer.prefix}: expert {w} input size {cols} is not a multiple of the "
                    f"checkpoint's group size {group}."
                )
            shapes = {
                "weight_packed": ((halves * rows, -(-cols // pw)), (1, pw), torch.int32),
                "weight_scale": ((halves * rows, cols // group), (1, group), torch.float32),
            }
            if not self.scheme.symmetric:
                zp_rows = halves * -(-rows // pw)
                shapes["weight_zero_point"] = ((zp_rows, cols // group), (pw, group), torch.int32)
            for name, (shape, block, dtype) in shapes.items():
                param = quant_param(torch.empty(e, *shape, dtype=dtype), layer)
                param.block_size = block
                setattr(layer, f"{w}_{name}", param)

    def dequantize(self, layer: MoELayer, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size_local
        device = layer.w13_weight_packed.device
        w13 = torch.empty(e, 2 * i, h, dtype=dtype, device=device)
        w2 = torch.empty(e, h, i, dtype=dtype, device=device)
        zp13 = getattr(layer, "w13_weight_zero_point", None)
        zp2 = getattr(layer, "w2_weight_zero_point", None)
        for x in range(e):  # one expert at a time: a small temporary
            for half in range(2):
                rows = slice(half * i, (half + 1) * i)
                zp = None
                if zp13 is not None:
                    zp_rows = zp13.shape[1] // 2
                    zp = zp13[x, half * zp_rows : (half + 1) * zp_rows]
                packed, scale = layer.w13_weight_packed[x, rows], layer.w13_weight_scale[x, rows]
                q, zero = unpack_weights(self.scheme, packed, scale, zp, h)
                w13[x, rows] = dequantize_ints(q, zero, scale, dtype)
            packed, scale = layer.w2_weight_packed[x], layer.w2_weight_scale[x]
            q, zero = unpack_weights(self.scheme, packed, scale, None if zp2 is None else zp2[x], i)
            w2[x] = dequantize_ints(q, zero, scale, dtype)
        return w13, w2


def unpack_weights(
    scheme: IntWeightScheme, packed: Tensor, scale: Tensor, zero_point: Tensor | None, cols: int
) -> tuple[Tensor, Tensor]:
    """One matrix's (q [N, K], zero points [N, K/g]) as signed int8, K = `cols`."""
    q = unpack_int32(packed, scheme.num_bits, cols)
    if zero_point is None:
        return q, torch.zeros_like(scale, dtype=torch.int8)
    return q, unpack_int32(zero_point.t(), scheme.num_bits, scale.shape[0]).t()


def dequantize_ints(q: Tensor, zero_point: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """W [N, K] = (q - zero point) * scale, each [N, K/g] value for its group of g columns."""
    group = q.shape[1] // scale.shape[1]
    zero = zero_point.repeat_interleave(group, 1).float()
    return ((q.float() - zero) * scale.repeat_interleave(group, 1)).to(dtype)


def unpack_int32(packed: Tensor, bits: int, count: int) -> Tensor:
    """packed int32 [R, W] (element i at bits i*b.. of its row, offset by 2^(b-1)) -> [R, count]
    signed int8. For b in (4, 8) no element straddles a word."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, per_word]
    values = values.reshape(packed.shape[0], -1)[:, :count]
    return (values - (1 << (bits - 1))).to(torch.int8)
