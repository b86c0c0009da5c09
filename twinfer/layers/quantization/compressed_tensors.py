"""compressed-tensors `pack-quantized` integer weights (W4A16 / W8A16): Kimi-K2.5, and every
community "AWQ 4bit" release made with llm-compressor (group 32, symmetric).

Per linear layer: `weight_packed` int32 [N, ceil(K*b/32)] (values offset-binary q + 2^(b-1),
element i at bit i*b of its row), `weight_scale` [N, K/g] (g the group size; 1 group for the
channel strategy), `weight_zero_point` int32 packed along N [ceil(N*b/32), K/g] when asymmetric,
and `weight_shape` [2] (redundant with config.json; not read). W = (q - zero_point) * scale.

Legend: `T` tokens, `N` output features, `K` input features, `b` bits, `g` group size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from twinfer.layers.quantization.base import (
    ExpertTensors,
    LinearMethod,
    MoEMethod,
    QuantizationConfig,
    fused_names,
    module_matches,
    quant_param,
)
from twinfer.layers.quantization.cpu_kernels import INT4_GROUP, int4_linear, pack_int4
from twinfer.layers.quantization.fp8 import (
    Fp8BlockLinearMethod,
    Fp8BlockMoEMethod,
    Fp8ChannelLinearMethod,
)
from twinfer.layers.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from twinfer.layers.linear import LinearBase
    from twinfer.layers.moe.layer import MoELayer

_FORMATS = ("pack-quantized", "float-quantized")


@dataclass(frozen=True, slots=True)
class FloatWeightScheme:
    """float-quantized FP8 e4m3 weights (`weight` + `weight_scale`), dynamic FP8 activations:
    a scale per (bn x bk) block, or per output row (`block` None: the channel strategy)."""

    block: tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class IntWeightScheme:
    num_bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    # `weight_g_idx` [K]: the group of each input column (GPTQ's act-order), not column // g.
    g_idx: bool = False


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
                    f"supported: {', '.join(_FORMATS)} (W4A16/W8A16 integer weights, FP8)."
                )
            if fmt == "float-quantized":
                scheme = _float_scheme(name, group)
            elif group.get("input_activations") is not None:
                raise ValueError(
                    f"compressed-tensors config group {name} quantizes activations too; twinfer "
                    "loads weight-only integer schemes (W4A16, W8A16) and FP8 W8A8."
                )
            else:
                scheme = _scheme(name, group.get("weights"))
            groups.append((list(group.get("targets") or []), scheme))
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
        if isinstance(scheme, FloatWeightScheme):
            return Fp8BlockLinearMethod(scheme.block) if scheme.block else Fp8ChannelLinearMethod()
        return UnquantizedLinearMethod() if scheme is None else PackedIntLinearMethod(scheme)

    def moe_kept_format(self) -> tuple[str, int] | None:
        kept = {_kept(s) for _, s in self.groups}
        fmt, group = kept.pop() if len(kept) == 1 else (None, None)
        return None if fmt is None else (fmt, group)

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, Tensor]]
    ) -> Iterable[tuple[str, Tensor]]:
        # FP8 modules' `weight_scale` multiplies the weight as DeepSeek's `weight_scale_inv`
        # does (despite its name): the FP8 methods' parameter.
        for name, tensor in weights:
            module, _, leaf = name.rpartition(".")
            if leaf == "weight_scale" and isinstance(self._scheme_of(module), FloatWeightScheme):
                name = f"{module}.weight_scale_inv"
            yield name, tensor

    def moe_method(self, prefix: str, gate_proj: str = "gate_proj") -> MoEMethod | None:
        # The checkpoints store per-expert Linear modules: expert 0's gate stands for them all.
        scheme = self._scheme_of(f"{prefix}.experts.0.{gate_proj}")
        if isinstance(scheme, FloatWeightScheme):
            if scheme.block is None:
                raise ValueError(
                    "this checkpoint stores routed experts as FP8 with a scale per channel, which "
                    "twinfer does not load yet; FP8 experts in blocks (FP8_BLOCK) are."
                )
            return Fp8BlockMoEMethod(scheme.block)
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
            (
                f"fp8 {'channel' if s.block is None else f'blocks {s.block[0]}x{s.block[1]}'}"
                if isinstance(s, FloatWeightScheme)
                else f"int{s.num_bits} {'channel' if s.group_size is None else f'g{s.group_size}'}"
                f"{'' if s.symmetric else ' asym'}"
            )
            for _, s in self.groups
        )
        fmt = "float-quantized" if kinds[0].startswith("fp8") else "pack-quantized"
        return f"compressed-tensors {fmt} ({', '.join(dict.fromkeys(kinds))})"


def _float_scheme(name: str, group: dict[str, Any]) -> FloatWeightScheme:
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ValueError(
            f"compressed-tensors config group {name}: float-quantized "
            f"{weights.get('type')} {weights.get('num_bits')}-bit weights; twinfer loads FP8."
        )
    if acts is not None and not acts.get("dynamic", False):
        raise ValueError(
            f"compressed-tensors config group {name} has static activation scales; twinfer runs "
            "FP8 with dynamic activations (FP8_DYNAMIC, FP8_BLOCK)."
        )
    strategy = weights.get("strategy")
    if strategy == "channel":
        return FloatWeightScheme(None)
    block = weights.get("block_structure")
    if strategy != "block" or not (isinstance(block, list | tuple) and len(block) == 2):
        raise ValueError(
            f"compressed-tensors config group {name}: FP8 strategy {strategy!r}; twinfer loads "
            "the channel and block ones."
        )
    return FloatWeightScheme((int(block[0]), int(block[1])))


def _kept(scheme: IntWeightScheme | FloatWeightScheme) -> tuple[str | None, int | None]:
    """(CPU engine format, group) that keeps a scheme's experts as they are, else (None, None)."""
    if isinstance(scheme, FloatWeightScheme):
        kept = scheme.block is not None and scheme.block[1] in (32, 64, 128)
        return ("fp8", scheme.block[1]) if kept else (None, None)
    fmt = _engine_format(scheme)
    return (fmt, scheme.group_size) if fmt else (None, None)


def _scheme(name: str, weights: dict[str, Any] | None) -> IntWeightScheme:
    if not weights:
        raise ValueError(f"compressed-tensors config group {name} has no weights scheme.")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if kind != "int" or bits not in (4, 8):
        raise ValueError(
            f"compressed-tensors config group {name}: {kind} {bits}-bit weights are not "
            "supported by pack-quantized loading; int4 and int8 are."
        )
    actorder = weights.get("actorder")
    if actorder not in (None, "static", "weight", "group"):  # "weight": no g_idx stored
        raise ValueError(
            f"compressed-tensors config group {name} uses actorder {actorder!r}; twinfer loads "
            "none, static, weight and group."
        )
    if strategy == "channel":
        return IntWeightScheme(bits, None, bool(weights.get("symmetric", True)))
    g_idx = actorder == "group"
    group = weights.get("group_size")
    if strategy != "group" or not isinstance(group, int) or group < 1:
        raise ValueError(
            f"compressed-tensors config group {name}: strategy {strategy!r} with group_size "
            f"{group!r}; twinfer loads the group (with a positive group_size) and channel ones."
        )
    return IntWeightScheme(bits, group, bool(weights.get("symmetric", True)), g_idx)


def _engine_format(scheme: IntWeightScheme) -> str | None:
    """The CPU engine's format that keeps this scheme's values: int4 (symmetric) or int4z (zero
    points) in groups of 32, 64 or 128 in column order; None when it has none."""
    if scheme.num_bits != 4 or scheme.group_size not in (32, 64, 128) or scheme.g_idx:
        return None
    return "int4" if scheme.symmetric else "int4z"


def compact_scales(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Scales in the model dtype when that is exact (checkpoints mostly store bf16 scales: half
    the bytes of float32 for a kernel to read), else float32."""
    small = scale.to(dtype)
    return small if torch.equal(small.float(), scale.float()) else scale.float()


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
        if self.scheme.g_idx:
            g_idx = torch.nn.Parameter(torch.empty(k, dtype=torch.int32), requires_grad=False)
            g_idx.weight_loader = load_g_idx
            layer.weight_g_idx = g_idx
        layer.input_perm = None  # act-order: x's columns in group order (see `sort_groups`)
        layer.gpu_int4 = None  # (qweight, scales, zeros) for the Triton W4A16 GEMM
        layer.quant_dtype = torch.get_default_dtype()  # the model dtype the layer computes in

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if self.scheme.g_idx:
            self.sort_groups(layer)
        if self._uses_gpu_kernel(layer):
            from twinfer.layers.quantization.triton_kernels import repack_w4a16, unpack_int4_rows

            zp = getattr(layer, "weight_zero_point", None)
            zeros = None if zp is None else unpack_int4_rows(zp.data, layer.output_size_local)
            scale = compact_scales(layer.weight_scale.data, layer.quant_dtype)
            layer.gpu_int4 = repack_w4a16(layer.weight_packed.data, scale, zeros)
            return
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

    def sort_groups(self, layer: LinearBase) -> None:
        """Act-order (g_idx): W's columns reordered so each group is contiguous, and x's columns
        with them at run time (`input_perm`): x W^T = x[:, perm] W[:, perm]^T."""
        k, group = layer.input_size_local, self.scheme.group_size or layer.input_size_local
        g_idx = layer.weight_g_idx.data.long()
        del layer.weight_g_idx
        if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group):
            return  # already in column order
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // group):
            raise ValueError(
                f"{layer.prefix}: weight_g_idx does not give every group exactly {group} "
                "columns; the checkpoint's act-order indices are corrupt."
            )
        q = unpack_int32(layer.weight_packed.data, self.scheme.num_bits, k)[:, perm]
        layer.weight_packed.data = pack_int32(q, self.scheme.num_bits)
        layer.input_perm = perm

    def _uses_gpu_kernel(self, layer: LinearBase) -> bool:
        group = self.scheme.group_size or layer.input_size_local
        return layer.weight_packed.is_cuda and self.scheme.num_bits == 4 and group % 16 == 0

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
        if layer.input_perm is not None:
            x = x.index_select(-1, layer.input_perm)
        if layer.gpu_int4 is not None:
            from twinfer.layers.quantization.triton_kernels import w4a16_matmul

            group = self.scheme.group_size or layer.input_size_local
            rows = x.reshape(-1, x.shape[-1])
            y = w4a16_matmul(rows, *layer.gpu_int4, group, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if layer.int4_weight is not None:
            return int4_linear(x, layer.int4_weight, bias)
        q, zero_point = self.integers(layer)
        return F.linear(x, dequantize_ints(q, zero_point, layer.weight_scale, x.dtype), bias)


class PackedIntMoEMethod(MoEMethod):
    """Routed experts as packed integers: `w13_weight_packed` [E, 2I, H/pw], `w2_weight_packed`
    [E, H, I/pw] (pw = 32/b values a word), their group scales, and (asymmetric) zero points
    packed along the rows; w13's rows are the gate's, then the up projection's."""

    def __init__(self, scheme: IntWeightScheme) -> None:
        if scheme.g_idx:
            raise ValueError(
                "this checkpoint quantizes routed experts with act-order (g_idx), which twinfer "
                "does not load yet; use a checkpoint without act-order (desc_act false) or with "
                "static/weight act-order."
            )
        self.scheme = scheme
        self.gpu: tuple | None = None  # (w13, w2, MoEQuant) for the fused Triton MoE

    def param_names(self) -> tuple[str, ...]:
        names = ("weight_packed", "weight_scale")
        if not self.scheme.symmetric:
            names += ("weight_zero_point",)
        return tuple(f"{w}_{name}" for w in ("w13", "w2") for name in names)

    def expert_tensors(self, layer: MoELayer, fmt: str, dtype: torch.dtype) -> ExpertTensors:
        # NOTE: the model dtype is enough: (q - z) s rounded to bf16 is off by at most 15 * 2^-9
        # of s, so the packer's round((w - m) / s) recovers q exactly (with f32 scales).
        w13, w2 = self.dequantize(layer, dtype)
        if fmt != _engine_format(self.scheme):
            return ExpertTensors(w13, w2)
        scales = (layer.w13_weight_scale.data.float(), layer.w2_weight_scale.data.float())
        offsets = None
        if not self.scheme.symmetric:  # W = (q - 8) s + (8 - z) s: offset m = -(z - 8) s
            zero13, zero2 = self.zero_points(layer)
            offsets = (-zero13.float() * scales[0], -zero2.float() * scales[1])
        return ExpertTensors(w13, w2, self.scheme.group_size, scales, offsets)

    def zero_points(self, layer: MoELayer) -> tuple[Tensor, Tensor]:
        """Signed zero points (z - 8) per row and group: w13 [E, 2I, H/g], w2 [E, H, I/g]."""
        i, h = layer.intermediate_size_local, layer.hidden_size
        zp13, zp2 = layer.w13_weight_zero_point.data, layer.w2_weight_zero_point.data
        half = zp13.shape[1] // 2  # gate and up are packed apart
        bits = self.scheme.num_bits
        z13 = torch.stack(
            [
                torch.cat(
                    [unpack_int32(z[:half].t(), bits, i), unpack_int32(z[half:].t(), bits, i)], 1
                )
                for z in zp13
            ]
        ).transpose(1, 2)
        z2 = torch.stack([unpack_int32(z.t(), bits, h) for z in zp2]).transpose(1, 2)
        return z13, z2

    def runs_on(self, device: torch.device) -> bool:
        group = self.scheme.group_size
        return device.type == "cuda" and self.scheme.num_bits == 4 and group and group % 16 == 0

    def prepare_device(self, layer: MoELayer) -> None:
        if self.gpu is not None:
            return
        from twinfer.layers.moe.triton_kernels import repack_moe_w4a16

        zp13 = getattr(layer, "w13_weight_zero_point", None)
        zp2 = getattr(layer, "w2_weight_zero_point", None)
        self.gpu = repack_moe_w4a16(
            layer.w13_weight_packed.data,
            compact_scales(layer.w13_weight_scale.data, layer.dtype),
            layer.w2_weight_packed.data,
            compact_scales(layer.w2_weight_scale.data, layer.dtype),
            None if zp13 is None else zp13.data,
            None if zp2 is None else zp2.data,
        )

    def apply(
        self, layer: MoELayer, hidden: Tensor, topk_weights: Tensor, topk_ids: Tensor
    ) -> Tensor:
        from twinfer.layers.moe.triton_kernels import fused_moe

        w13, w2, quant = self.gpu
        return fused_moe(hidden, topk_weights, topk_ids, w13, w2, quant=quant)

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


def load_g_idx(param: Tensor, loaded: Tensor, shard_id: object = None) -> None:
    """One column order for a fused layer: its projections (q, k, v; gate, up) share their
    input, so act-order quantization gives them the same g_idx."""
    if loaded.shape != param.shape:
        raise ValueError(
            f"weight_g_idx has {list(loaded.shape)} entries but the layer has {param.shape[0]} "
            "input columns; the checkpoint does not match config.json."
        )
    first = getattr(param, "g_idx_loaded", False)
    if first and not torch.equal(param.data, loaded.to(param.dtype)):
        raise ValueError(
            "the projections of a fused layer (q/k/v or gate/up) have different act-order "
            "g_idx; twinfer fuses them into one layer, which needs one column order."
        )
    param.data.copy_(loaded)
    param.g_idx_loaded = True


def pack_int32(q: Tensor, bits: int) -> Tensor:
    """q [R, C] signed (offset by 2^(b-1) when stored) -> int32 [R, ceil(C*b/32)], element i at
    bits i*b of its row: the inverse of `unpack_int32`."""
    per_word = 32 // bits
    rows, cols = q.shape
    values = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    values = torch.nn.functional.pad(values, (0, -cols % per_word)).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (values << shifts).sum(-1)  # < 2^32: each value has its own bits
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, count: int) -> Tensor:
    """packed int32 [R, W] (element i at bits i*b.. of its row, offset by 2^(b-1)) -> [R, count]
    signed int8. For b in (4, 8) no element straddles a word."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, per_word]
    values = values.reshape(packed.shape[0], -1)[:, :count]
    return (values - (1 << (bits - 1))).to(torch.int8)
