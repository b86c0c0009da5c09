"""Which MoE layers keep their routed experts in VRAM and which in host RAM, and in what format.

The plan is made before the model is built (so host experts never touch VRAM) from the flags users
of llama.cpp and KTransformers know: --cpu-moe, --n-cpu-moe N, --moe-gpu-layers 0-5,40 and
--moe-vram-budget auto|GiB. The model gets it when it is built and hands it to each MoE layer
(an `ExpertPlan`: where the layer's experts live, and the builder that packs host experts for the
CPU expert engine after loading). Attention, dense layers, shared experts, routers and the KV
cache always stay on the device.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from twinfer.config import EngineConfig, parse_layer_list, parse_vram_budget
from twinfer.hybrid.numa import CpuTopology, WorkerPlan, default_threads, plan_workers
from twinfer.layers.moe.placement import ExpertPlacement, format_of_dtype
from twinfer.native import native_engine, native_error

if TYPE_CHECKING:
    from twinfer.hybrid.cpu_experts import CpuExpertEngine, HostExperts
    from twinfer.layers.moe import MoELayer
    from twinfer.loader.model_loader import ModelInfo

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
# Expert format names (ExpertPlacement's) -> the native engine's.
NATIVE_FORMATS = {
    "fp32": "f32",
    "bf16": "bf16",
    "fp16": "f16",
    "fp8": "fp8",
    "int8": "int8",
    "int4": "int4",
    "int4z": "int4z",
}
GROUPED_FORMATS = ("int4", "int4z", "fp8")  # formats with a scale per group of columns
# VRAM kept for activations, the sampler's logits and CUDA graphs when the budget is auto.
_AUTO_RESERVE_BYTES = 2**30


@dataclass(frozen=True, slots=True)
class MoELayerShape:
    """One MoE layer of the model: decoder layer index and expert shape."""

    layer: int
    num_experts: int
    top_k: int
    hidden: int
    inner: int


def expert_bytes(fmt: str, hidden: int, inner: int, group_size: int) -> int:
    """Bytes of one routed expert (gate, up: [I, H]; down: [H, I]) in an expert format."""
    if native_engine is not None:
        nf, g = NATIVE_FORMATS[fmt], group_size if fmt in GROUPED_FORMATS else 0
        return native_engine.packed_bytes(nf, 2 * inner, hidden, g) + native_engine.packed_bytes(
            nf, hidden, inner, g
        )
    per_value = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}.get(fmt, 0.5)  # int4
    return int(3 * hidden * inner * per_value)


@dataclass(slots=True)
class MoEPlan:
    """Where each MoE layer's routed experts live, and how the CPU expert engine runs them."""

    shapes: list[MoELayerShape]
    host_layers: frozenset[int]
    device_format: str  # the model dtype's format: experts kept in VRAM (or device memory)
    host_format: str  # bf16 | fp16 | fp32 | int8 | int4
    group_size: int
    workers: WorkerPlan
    spin_us: int
    max_tokens: int  # rows of the pinned staging buffers (the step's token budget)
    device: torch.device
    dense_bytes: int
    vram_budget: str | None = None  # --moe-vram-budget, applied by fill_vram_budget at load
    gpu_memory_utilization: float = 0.9
    _engine: CpuExpertEngine | None = field(default=None, repr=False)

    def location(self, layer: int) -> str:
        return "host" if layer in self.host_layers else "gpu"

    def layer_placement(
        self, prefix: str, num_experts: int
    ) -> tuple[ExpertPlacement, HostPacker | None]:
        """The ExpertPlan of the model's MoE layers: all of a layer's experts in one place."""
        location = self.location(self.layer_of(prefix))
        if location == "gpu":
            return ExpertPlacement.uniform(num_experts, "gpu", self.device_format), None
        return ExpertPlacement.uniform(num_experts, "host", self.host_format), HostPacker(self)

    def layer_of(self, prefix: str) -> int:
        match = _LAYER_INDEX.search(prefix + ".")
        if match is None:
            raise ValueError(f"cannot tell the layer index of MoE module {prefix!r}")
        return int(match.group(1))

    def cpu_engine(self) -> CpuExpertEngine:
        """The engine that runs this model's host experts (made on first use)."""
        if self._engine is None:
            from twinfer.hybrid.cpu_experts import CpuExpertEngine

            self._engine = CpuExpertEngine(self.workers, self.spin_us, self.max_tokens)
        return self._engine

    def layer_bytes(self, s: MoELayerShape) -> int:
        """Bytes of one layer's routed experts where they live, in their format there."""
        host = s.layer in self.host_layers
        fmt = self.host_format if host else self.device_format
        return s.num_experts * expert_bytes(fmt, s.hidden, s.inner, self.group_size)

    def bytes_at(self, location: str) -> int:
        return sum(self.layer_bytes(s) for s in self.shapes if self.location(s.layer) == location)

    def host_bytes_per_token(self) -> int:
        """Host expert bytes a batch-1 decode step reads: top-k experts of every host layer."""
        return sum(
            self.layer_bytes(s) * s.top_k // s.num_experts
            for s in self.shapes
            if s.layer in self.host_layers
        )

    def describe(self, dram_gbps: float | None = None) -> str:
        """The startup log's placement table: runs of layers, where and in which format their
        experts live, their bytes, and the batch-1 decode bound the host part implies."""
        fmt = {"host": self.host_format, "gpu": self.device_format}
        if self.host_format in GROUPED_FORMATS:
            fmt["host"] = f"{self.host_format}/g{self.group_size}"
        where = {"host": "host RAM", "gpu": "VRAM" if self.device.type == "cuda" else "RAM"}
        first = self.shapes[0]
        head = f"MoE placement: {len(self.shapes)} MoE layers of {first.num_experts} experts"
        head += f" (top-{first.top_k})"
        if self.host_layers:
            head += (
                f"; CPU expert engine: {self.workers.num_threads} threads on NUMA nodes "
                f"{sorted(set(self.workers.nodes))}"
            )
        lines = [head]
        runs: list[list[Any]] = []  # [first layer, last layer, location, bytes]
        for s in self.shapes:
            loc = self.location(s.layer)
            if runs and runs[-1][2] == loc:
                runs[-1][1] = s.layer
                runs[-1][3] += self.layer_bytes(s)
            else:
                runs.append([s.layer, s.layer, loc, self.layer_bytes(s)])
        for lo, hi, loc, nbytes in runs:
            span = f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"
            lines.append(f"  {span}: experts in {where[loc]} as {fmt[loc]}, {_size(nbytes)}")
        lines.append(
            f"  dense part {_size(self.dense_bytes)} + experts {_size(self.bytes_at('gpu'))} in "
            f"{where['gpu']}; experts {_size(self.bytes_at('host'))} in host RAM"
        )
        if self.host_layers and dram_gbps:
            per_token = self.host_bytes_per_token()
            lines.append(
                f"  decode bound at batch 1: {_size(per_token)} of host experts per token / "
                f"{dram_gbps:.0f} GB/s DRAM read = {dram_gbps * 1e9 / per_token:,.0f} tokens/s"
            )
        return "\n".join(lines)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class HostPacker:
    """Packs a loaded MoE layer's host experts for the plan's CPU expert engine (in the plan's
    host format, from the checkpoint's own values where that format keeps them)."""

    def __init__(self, plan: MoEPlan) -> None:
        self.plan = plan

    def build(self, layer: MoELayer) -> HostExperts:
        fmt = self.plan.host_format
        if layer.quant_method is not None:
            experts = layer.quant_method.expert_tensors(layer, fmt, layer.dtype)
        else:
            from twinfer.layers.quantization import ExpertTensors

            experts = ExpertTensors(layer.w13_weight.data, layer.w2_weight.data)
        if experts.scales is not None and experts.group != self.plan.group_size:
            raise ValueError(
                f"{layer.prefix}: the checkpoint's {fmt} groups of {experts.group} do not match "
                f"the engine's {self.plan.group_size}."
            )
        return self.plan.cpu_engine().add_layer(
            experts.w13, experts.w2, NATIVE_FORMATS[fmt], self.plan.group_size, experts.scales,
            experts.offsets,
        )  # fmt: skip


def model_moe_shapes(model_cls: type, hf_config: Any) -> tuple[list[MoELayerShape], int]:
    """The MoE layers of a model and its dense bytes, from a weightless (meta) copy of it."""
    from twinfer.layers.moe import MoELayer
    from twinfer.parallel import ParallelConfig

    with torch.device("meta"):
        model: nn.Module = model_cls(hf_config, ParallelConfig())
    shapes: list[MoELayerShape] = []
    expert_params = 0
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            match = _LAYER_INDEX.search(name + ".")
            layer = int(match.group(1)) if match else len(shapes)
            shapes.append(
                MoELayerShape(layer, m.num_experts, m.top_k, m.hidden_size, m.intermediate_size)
            )
            expert_params += m.w13_weight.numel() + m.w2_weight.numel()
    dense_params = sum(p.numel() for p in model.parameters()) - expert_params
    return shapes, dense_params


def plan_moe(config: EngineConfig, info: ModelInfo, model_cls: type) -> MoEPlan | None:
    """The placement of `info`'s model under `config`'s flags; None when it has no MoE layers."""
    shapes, dense_params = model_moe_shapes(model_cls, info.hf_config)
    if not shapes:
        for flag, value in (
            ("--cpu-moe", config.cpu_moe),
            ("--n-cpu-moe", config.n_cpu_moe),
            ("--moe-gpu-layers", config.moe_gpu_layers),
        ):
            if value:
                logger.warning("%s ignored: the model has no MoE layers", flag)
        return None
    device = info.device
    device_format = format_of_dtype(info.dtype)
    dense_bytes = dense_params * info.dtype.itemsize
    layers = [s.layer for s in shapes]
    host = _host_layers(config, device, layers)
    host_format = device_format if config.moe_cpu_dtype == "keep" else config.moe_cpu_dtype
    group = config.moe_cpu_group_size
    kept = info.quant_config.moe_kept_format()
    if config.moe_cpu_dtype == "keep" and kept is not None:
        # The checkpoint's own grid (int4 groups, fp8 blocks) is packed as is, in its groups.
        host_format, group = kept
    bad = sorted({d for s in shapes for d in (s.hidden, s.inner) if d % group})
    if host and host_format in GROUPED_FORMATS and bad:
        fix = (
            "use a --moe-cpu-group-size that divides them (32, 64 or 128)"
            if kept is None or config.moe_cpu_dtype != "keep"
            else "use --moe-cpu-dtype bf16 or int4 for this checkpoint"
        )
        raise ValueError(
            f"{host_format} groups of {group} do not divide the expert sizes {bad} (hidden and "
            f"expert inner size); {fix}."
        )
    _check_native(host_format, bool(host))
    topology = CpuTopology.detect()
    threads = config.moe_cpu_threads or default_threads(topology, device.type == "cuda")
    plan = MoEPlan(
        shapes=shapes,
        host_layers=frozenset(host),
        device_format=device_format,
        host_format=host_format,
        group_size=group,
        workers=plan_workers(topology, threads, config.moe_thread_binding),
        # NOTE: with a GPU the workers spin through the GPU's part of a layer (~50 us), so the
        # next layer starts without a wake-up; on the CPU alone torch's own threads need the
        # cores between layers, and power saving trades a wake-up per layer for the spinning.
        spin_us=20 if config.moe_cpu_power_saving or device.type == "cpu" else 2000,
        # A step's tokens, or a CUDA graph's padded decode batch if that is larger.
        max_tokens=max(
            config.resolved_max_num_batched_tokens(device, bool(host)), config.max_num_seqs
        ),
        device=device,
        dense_bytes=dense_bytes,
        vram_budget=config.moe_vram_budget,
        gpu_memory_utilization=config.gpu_memory_utilization,
    )
    return plan


def _host_layers(config: EngineConfig, device: torch.device, layers: list[int]) -> list[int]:
    """The MoE layers (decoder indices) whose routed experts go to host RAM."""
    if config.cpu_moe:
        return layers
    if config.n_cpu_moe is not None:
        if config.n_cpu_moe > len(layers):
            raise ValueError(
                f"--n-cpu-moe {config.n_cpu_moe} is more than the model's {len(layers)} MoE "
                f"layers; use at most {len(layers)} (or --cpu-moe for all of them)."
            )
        return layers[: config.n_cpu_moe]
    if config.moe_gpu_layers is not None:
        keep = parse_layer_list(config.moe_gpu_layers)
        if bad := sorted(set(keep) - set(layers)):
            raise ValueError(
                f"--moe-gpu-layers names {bad}, which are not MoE layers of this model; its MoE "
                f"layers are {_ranges(layers)}."
            )
        return [layer for layer in layers if layer not in keep]
    if config.moe_vram_budget is not None:
        if device.type != "cuda":
            raise ValueError("--moe-vram-budget sizes VRAM; it needs a GPU (--device cuda).")
        return layers  # fill_vram_budget moves layers back to the GPU
    if device.type == "cpu" and config.moe_backend in ("auto", "native"):
        if native_engine is not None:
            return layers  # the CPU-only mode runs its experts on the native engine
        if config.moe_backend == "native":
            raise ValueError(f"--moe-backend native: {native_error}")
    return []


def _check_native(host_format: str, any_host: bool) -> None:
    if not any_host:
        return
    if native_engine is None:
        if host_format in ("int8", *GROUPED_FORMATS):
            raise ValueError(
                f"--moe-cpu-dtype {host_format} needs the native CPU expert engine: "
                f"{native_error}; or use --moe-cpu-dtype keep."
            )
        logger.warning(
            "%s; until then host experts run on torch's CPU kernels: several times slower, "
            "and no CUDA graphs",
            native_error,
        )
        return
    features = native_engine.cpu_features()
    if host_format in ("int8", *GROUPED_FORMATS) and not (features["avx2"] or features["avx512f"]):
        raise ValueError(
            f"--moe-cpu-dtype {host_format}: this CPU has neither AVX2 nor AVX-512, which the "
            "quantized CPU expert kernels need; use --moe-cpu-dtype keep or bf16."
        )


def fill_vram_budget(plan: MoEPlan, info: ModelInfo) -> None:
    """--moe-vram-budget: keep whole expert layers in VRAM while they fit, the best first.

    Runs in the engine process just before the model is built (it asks the GPU what is free).
    """
    if plan.vram_budget is None:
        return
    free, total = torch.cuda.mem_get_info(info.device)
    budget_gib = parse_vram_budget(plan.vram_budget)
    if budget_gib is None:
        from twinfer.bench.model_cost import ModelCost

        dtype = str(info.dtype).removeprefix("torch.")
        kv = ModelCost.from_config(info.hf_config, dtype).kv_bytes_per_token * info.max_model_len
        budget = int(min(plan.gpu_memory_utilization * total, free)) - kv - _AUTO_RESERVE_BYTES
        what = (
            f"auto: {free / 2**30:.1f} GiB free, less {kv / 2**30:.2f} GiB of KV cache for one "
            f"{info.max_model_len}-token sequence and {_AUTO_RESERVE_BYTES / 2**30:.0f} GiB "
            "for activations"
        )
    else:
        budget = int(budget_gib * 2**30)
        what = f"{budget_gib:g} GiB"
        if budget > free:
            raise ValueError(
                f"--moe-vram-budget {budget_gib:g} GiB is more than the {free / 2**30:.1f} GiB "
                "of VRAM free; lower it or use auto."
            )
    if budget < plan.dense_bytes:
        raise ValueError(
            f"--moe-vram-budget ({what}) cannot hold the dense part of the model "
            f"({plan.dense_bytes / 2**30:.2f} GiB: embeddings, attention, norms, routers, dense "
            f"MLPs); give at least {plan.dense_bytes / 2**30:.2f} GiB, free VRAM, or lower "
            "--max-model-len."
        )
    left = budget - plan.dense_bytes

    # NOTE: "benefit" is the host bytes a token no longer reads per VRAM byte spent; layers of
    # one model mostly tie, and then the earliest layers go first.
    def benefit(s: MoELayerShape) -> float:
        host = expert_bytes(plan.host_format, s.hidden, s.inner, plan.group_size)
        gpu = expert_bytes(plan.device_format, s.hidden, s.inner, plan.group_size)
        return s.top_k * host / (s.num_experts * gpu)

    host = set(plan.host_layers)
    for s in sorted(plan.shapes, key=lambda s: (-benefit(s), s.layer)):
        size = s.num_experts * expert_bytes(plan.device_format, s.hidden, s.inner, 0)
        if size <= left:
            host.discard(s.layer)
            left -= size
    plan.host_layers = frozenset(host)
    logger.info(
        "--moe-vram-budget %s: %d of %d MoE layers keep their experts in VRAM",
        what,
        len(plan.shapes) - len(host),
        len(plan.shapes),
    )


def _ranges(layers: list[int]) -> str:
    out: list[str] = []
    for layer in layers:
        if out and out[-1].split("-")[-1] == str(layer - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{layer}"
        else:
            out.append(str(layer))
    return ",".join(out)
