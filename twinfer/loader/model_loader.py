"""Turn an EngineConfig into a loaded model, its tokenizer and its generation defaults."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinfer.config import EngineConfig
from twinfer.hybrid.placement import MoEPlan, fill_vram_budget, plan_moe
from twinfer.layers.quantization import (
    ONLINE_METHODS,
    QuantizationConfig,
    UnquantizedConfig,
    get_quantization_config,
)
from twinfer.layers.quantization.gguf_grid import GgufGridConfig
from twinfer.loader.resolve import ModelSource, resolve_model
from twinfer.loader.safetensors import iter_safetensors, safetensors_files
from twinfer.parallel import ParallelConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelInfo:
    """Everything the engine needs to know about the model before it runs."""

    source: ModelSource
    hf_config: Any  # transformers.PretrainedConfig
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    vocab_size: int
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    generation_defaults_from: str = "none"  # where they came from, for the start-up log
    quant_config: QuantizationConfig = field(default_factory=UnquantizedConfig)
    weight_bytes: int = 0  # filled by load_model
    load_format: str = "auto"  # "dummy": random weights, no checkpoint read
    moe_plan: MoEPlan | None = None  # where routed experts live (hybrid.placement)

    def describe_sampling_defaults(self) -> str:
        """E.g. 'temperature 0.2, top_p 0.9 (from the ... model card)', for the start-up log."""
        if not self.generation_defaults:
            return "none (temperature 1.0, the full vocabulary); requests set their own"
        values = ", ".join(f"{k} {v}" for k, v in self.generation_defaults.items())
        return f"{values} (from {self.generation_defaults_from}); a request's own values win"

    @property
    def has_host_experts(self) -> bool:
        return self.moe_plan is not None and bool(self.moe_plan.host_layers)


@functools.lru_cache(maxsize=2)
def open_gguf(path: Path) -> Any:
    """One parsed GGUF per file for config, tokenizer, weights and int4 grids alike."""
    from twinfer.loader.gguf import GGUFCheckpoint

    return GGUFCheckpoint(path)


def load_hf_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    if source.kind == "gguf":
        values = dict(open_gguf(source.path).hf_config())
        model_type = values.pop("model_type")
        return AutoConfig.for_model(model_type, **values)
    config_file = source.path / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc}); re-download it.") from exc
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        if "auto_map" in raw:
            raise ValueError(
                f"model {source.name} needs --trust-remote-code (its config.json names custom "
                f"code: {raw['auto_map']}); twinfer never runs code shipped with a model, so it "
                "cannot serve this checkpoint."
            ) from exc
        raise ValueError(
            f"cannot read {config_file} ({exc}); model_type {raw.get('model_type')!r} is not "
            "known to the installed transformers."
        ) from exc


def resolve_dtype(
    config: EngineConfig, hf_config: Any, source: ModelSource, device: torch.device
) -> torch.dtype:
    if config.torch_dtype is not None:
        return config.torch_dtype
    # transformers >= 4.56 names it `dtype` (reading `torch_dtype` there warns).
    name = "dtype" if hasattr(hf_config, "dtype") else "torch_dtype"
    ckpt = getattr(hf_config, name, None)
    if isinstance(ckpt, str):
        ckpt = getattr(torch, ckpt, None)
    if device.type == "cuda":
        return torch.bfloat16 if source.kind == "gguf" or ckpt in (None, torch.float32) else ckpt
    # NOTE: on the CPU, bf16 (vLLM's CPU default) pays off only with native bf16 math
    # (AVX512-BF16 / AMX): then it halves the bytes a decode step reads. Else fp32; fp16 never.
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_info(config: EngineConfig) -> ModelInfo:
    from twinfer.models.registry import get_model_class

    source = resolve_model(config.model)
    hf_config = load_hf_config(source)
    get_model_class(list(getattr(hf_config, "architectures", None) or []))
    device = config.resolved_device()
    dtype = resolve_dtype(config, hf_config, source, device)
    # Fails before any weight is read: e.g. an fp8 KV cache with an attention backend that cannot.
    config.resolved_kv_cache_dtype(dtype, config.resolved_backend("attention_backend", device))
    limit = getattr(hf_config, "max_position_embeddings", None)
    max_model_len = config.max_model_len or limit or 2048
    if limit is not None and max_model_len > limit:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's limit of {limit} positions "
            f"(max_position_embeddings); lower --max-model-len to at most {limit}."
        )
    _check_sliding_window(hf_config, int(max_model_len))
    gen, gen_from = _generation_config(config, source)
    eos = gen.pop("eos_token_id", None)
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    bos = gen.pop("bos_token_id", getattr(hf_config, "bos_token_id", None))
    defaults = {k: gen[k] for k in (*_SAMPLING_KEYS, "max_new_tokens") if gen.get(k) is not None}
    for key, value in defaults.items():
        if isinstance(value, float):  # GGUF stores float32: 0.2 reads 0.20000000298023224
            defaults[key] = float(f"{value:.6g}")
    if defaults.get("top_k", 1) <= 0:  # transformers and llama.cpp mean "off"; twinfer says -1
        defaults["top_k"] = -1
    info = ModelInfo(
        source=source,
        hf_config=hf_config,
        dtype=dtype,
        device=device,
        max_model_len=int(max_model_len),
        eos_token_ids=eos_ids,
        bos_token_id=bos,
        vocab_size=int(hf_config.vocab_size),
        generation_defaults=defaults,
        generation_defaults_from=gen_from,
        load_format=config.load_format,
    )
    if source.kind == "hf" or config.quantization is not None:
        if source.kind == "gguf":
            raise ValueError(
                f"--quantization {config.quantization} quantizes safetensors checkpoints; a GGUF "
                "file keeps its own formats (Q4 matrices already run on their int4 grid)."
            )
        hf_quant = getattr(hf_config, "quantization_config", None)
        if hf_quant is None and source.kind == "hf":
            hf_quant = _legacy_quant_config(Path(source.path))
        info.quant_config = get_quantization_config(hf_quant, config.quantization)
        if config.quantization is not None:
            ONLINE_METHODS[config.quantization].check_device(device, dtype)
    else:  # a GGUF: its Q4 matrices stay on their int4 grid where a kernel reads them
        gguf = open_gguf(source.path)
        dense = gguf.q4_dense_modules() if _keeps_int4(info) else set()
        if (parts := gguf.q4_expert_parts()) or dense:
            info.quant_config = GgufGridConfig(parts, dense)
    info.moe_plan = plan_moe(config, info, get_model_class(list(hf_config.architectures)))
    return info


# Files older AutoGPTQ / AutoAWQ exports keep their settings in, beside config.json.
_LEGACY_QUANT_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


def _legacy_quant_config(path: Path) -> dict | None:
    for file, method in _LEGACY_QUANT_FILES.items():
        if (path / file).is_file():
            config = json.loads((path / file).read_text())
            return {"quant_method": method, **config}
    return None


def _check_sliding_window(hf_config: Any, max_model_len: int) -> None:
    """Sliding-window attention is not implemented; up to the window it equals full attention."""
    from twinfer.models.llama import sliding_window_of

    window = sliding_window_of(hf_config)
    if window is not None and max_model_len > window:
        raise ValueError(
            f"this model uses sliding-window attention (window {window} tokens), which twinfer "
            f"does not implement yet, and max_model_len is {max_model_len}; pass "
            f"--max-model-len {window} (or less), where it equals full attention."
        )


def _generation_config(config: EngineConfig, source: ModelSource) -> tuple[dict[str, Any], str]:
    """The generation config's keys and where they came from. With `auto`, sampling defaults
    the model is known to recommend (`source.recommended_sampling`) fill what its files lack."""
    if config.generation_config == "vllm":
        return {}, "none"
    if source.kind == "gguf" and config.generation_config == "auto":
        gen, origin = dict(open_gguf(source.path).generation_config()), "the GGUF's metadata"
    else:
        auto = config.generation_config == "auto"
        folder = source.path if auto else Path(config.generation_config)
        path = folder / "generation_config.json"
        if not path.is_file():
            if not auto:
                raise ValueError(f"--generation-config {folder} has no generation_config.json.")
            gen, origin = {}, "none"
        else:
            try:
                gen, origin = json.loads(path.read_text()), str(path)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); fix or delete it.") from exc
    recommended = source.recommended_sampling
    if config.generation_config == "auto" and recommended and not gen.keys() & _SAMPLING_KEYS:
        from twinfer.loader.resolve import DEFAULT_MODEL_SAMPLING_FROM

        gen.update(recommended)
        origin = DEFAULT_MODEL_SAMPLING_FROM
    return gen, origin


_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def load_tokenizer(config: EngineConfig, source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    tok_source = resolve_model(config.tokenizer) if config.tokenizer is not None else source
    if tok_source.kind == "gguf":
        return open_gguf(tok_source.path).tokenizer()
    try:
        return AutoTokenizer.from_pretrained(tok_source.path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"cannot load a tokenizer from {tok_source.path} ({exc}); the directory needs "
            "tokenizer.json (or a tokenizer model) and tokenizer_config.json, or pass --tokenizer."
        ) from exc


def _weights(info: ModelInfo) -> Iterator[tuple[str, torch.Tensor]]:
    if info.source.kind == "gguf":
        quant = info.quant_config
        grids = isinstance(quant, GgufGridConfig)
        yield from open_gguf(info.source.path).weights(
            info.dtype,
            expert_grids=grids,
            dense_grids=quant.dense_modules if grids else frozenset(),
        )
    else:
        tensors = iter_safetensors(safetensors_files(info.source.path))
        yield from info.quant_config.checkpoint_tensors(tensors)


def _keeps_int4(info: ModelInfo) -> bool:
    """GGUF Q4 weights stay int4 on the CPU when activations are bf16/fp16 (fast kernels)."""
    return (
        info.source.kind == "gguf"
        and info.device.type == "cpu"
        and info.dtype in (torch.bfloat16, torch.float16)
    )


def _dummy_weights(model: nn.Module) -> set[str]:
    """Random weights (vLLM's `--load-format dummy`): uniform in ±1e-3, seeded, where each
    parameter lives (the device, or host RAM for host experts).

    NOTE: speed does not depend on weight values, so benchmarks of a shape skip writing and
    reading a checkpoint of many GB; the small range keeps activations finite in every layer.
    """
    gens: dict[torch.device, torch.Generator] = {}
    for p in model.parameters():
        if p.device not in gens:
            gens[p.device] = torch.Generator(p.device).manual_seed(0)
        if not p.dtype.is_floating_point:  # packed integers (e.g. int4 words): any bits will do
            bits = torch.randint(
                -(2**31), 2**31 - 1, p.shape, generator=gens[p.device], device=p.device
            )
            p.copy_(bits)
        elif p.element_size() == 1:  # fp8: no uniform_ kernel
            noise = torch.empty(p.shape, device=p.device).uniform_(
                -1e-3, 1e-3, generator=gens[p.device]
            )
            p.copy_(noise)
        else:
            p.uniform_(-1e-3, 1e-3, generator=gens[p.device])
    return set(dict(model.named_parameters()))


def load_model(info: ModelInfo) -> nn.Module:
    """Build the model on its device in its dtype and fill it from the checkpoint."""
    from twinfer.models.registry import get_model_class

    start = time.perf_counter()
    model_cls = get_model_class(list(info.hf_config.architectures))
    plan = info.moe_plan
    if plan is not None:
        fill_vram_budget(plan, info)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(info.dtype)
    try:
        with info.device:
            model = model_cls(info.hf_config, ParallelConfig(), info.quant_config, plan)
    finally:
        torch.set_default_dtype(previous)
    wanted = set(dict(model.named_parameters()))  # (MoE layers swap theirs as they load)
    with torch.no_grad():
        if info.load_format == "dummy":
            loaded = _dummy_weights(model)
        else:
            loaded = model.load_weights(_weights(info))
    missing = sorted(wanted - set(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"the checkpoint {info.source.path} lacks weights the model needs: {shown}; the "
            "files are incomplete or do not match config.json."
        )
    model.eval()
    with torch.no_grad():
        for module in model.modules():  # (MoE layers were prepared as they loaded)
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    host = sum(m.host_experts.nbytes for m in model.modules() if getattr(m, "host_experts", None))
    info.weight_bytes = nbytes + host
    logger.info(
        "loaded %s (%s) in %.1f s: %.2f GiB of weights on %s (%s)%s; weight format %s",
        info.source.name,
        info.hf_config.architectures[0],
        time.perf_counter() - start,
        nbytes / 2**30,
        info.device,
        str(info.dtype).removeprefix("torch."),
        f" + {host / 2**30:.2f} GiB of experts in host RAM" if host else "",
        info.quant_config.describe(),
    )
    if plan is not None and (plan.host_layers or plan.vram_budget is not None):
        engine = plan.cpu_engine() if plan.host_layers else None
        logger.info("%s", plan.describe(engine.read_gbps() if engine else None))
    return model
