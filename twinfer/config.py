"""EngineConfig: every engine setting under its vLLM flag name, validated with clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from twinfer.layers.quantization.online import ONLINE_METHODS

_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}
_DEVICES = ("auto", "cpu", "cuda")
_CUDAGRAPH_MODES = ("none", "full_decode_only")
_KERNEL_BACKENDS = ("auto", "torch", "triton")
_MOE_BACKENDS = (*_KERNEL_BACKENDS, "native")
_LOAD_FORMATS = ("auto", "dummy")
# vLLM's names; "fp8" is e4m3. NOTE: stored with scale 1.0 (vLLM's default without checkpoint
# scales); torch's cast saturates at e4m3's +-448 instead of overflowing.
_KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
MOE_CPU_DTYPES = ("keep", "bf16", "fp8", "int8", "int4")
_INT4_GROUP_SIZES = (32, 64, 128)
_THREAD_BINDINGS = ("core", "numa")


@dataclass(slots=True)
class CompilationConfig:
    """Nested settings, vLLM-style (`--compilation-config '{...}'`, YAML dotted keys)."""

    cudagraph_mode: str = field(
        default="full_decode_only",
        metadata={
            "help": "none | full_decode_only: capture decode steps as CUDA graphs on the GPU "
            "(the CUDA path; the CPU runs eagerly)."
        },
    )
    max_cudagraph_capture_size: int | None = field(
        default=None, metadata={"help": "Largest decode batch captured (default max_num_seqs)."}
    )

    def __post_init__(self) -> None:
        self.cudagraph_mode = str(self.cudagraph_mode).lower()
        if self.cudagraph_mode not in _CUDAGRAPH_MODES:
            raise ValueError(
                f"compilation_config.cudagraph_mode {self.cudagraph_mode!r} is unknown; choose "
                f"one of {', '.join(_CUDAGRAPH_MODES)}."
            )
        size = self.max_cudagraph_capture_size
        if size is not None and size < 1:
            raise ValueError(
                f"compilation_config.max_cudagraph_capture_size must be at least 1, got {size}."
            )

    @classmethod
    def from_value(cls, value: Any) -> CompilationConfig:
        """From a dict (YAML) or a JSON string (the CLI); unknown keys are named in the error."""
        if isinstance(value, CompilationConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--compilation-config is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"compilation_config must be a mapping, got {value!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"unknown key compilation_config.{unknown[0]}; known: {', '.join(sorted(known))}."
            )
        return cls(**value)


@dataclass(slots=True)
class EngineConfig:
    """Engine settings with vLLM's names (`LLM(**kwargs)` and `--flag-name` on the CLI)."""

    model: str | None = field(
        default=None,
        metadata={"help": "HF directory, .gguf file or cached hub id (default: SmolLM2-135M)."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or hub id (default: the model's)."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto | float32 | bfloat16 | float16 (auto: the checkpoint's, fp32 on CPU "
            "without bf16 support)."
        },
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + output (default: the model's limit)."}
    )
    max_num_seqs: int = field(default=256, metadata={"help": "Most sequences in one step."})
    max_num_batched_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one step; longer prompts are chunked (default: 256 on the "
            "CPU, 2048 on a GPU)."
        },
    )
    block_size: int = field(default=16, metadata={"help": "Tokens per KV cache block."})
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "Reuse the KV cache of shared prompt prefixes."}
    )
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata={
            "help": "Fraction of the GPU's memory twinfer may use: weights, activations, CUDA "
            "graphs, and the KV cache, which gets what is left."
        },
    )
    kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Bytes for the KV cache (default: on a GPU, what --gpu-memory-utilization "
            "leaves; on the CPU, enough for max_num_seqs sequences of max_model_len, at most "
            "1 GiB)."
        },
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "Quantize a plain checkpoint at load: fp8 (GPU: e4m3 in 128x128 blocks, "
            "experts too) | int4 (alias sym_int4; CPU, dense layers, bf16/fp16). Quantized "
            "checkpoints are read as published without it."
        },
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (the model dtype) | fp8 (= fp8_e4m3) | fp8_e5m2: one byte a value, twice "
            "the tokens of bf16 in the same memory (torch and triton attention)."
        },
    )
    num_gpu_blocks_override: int | None = field(
        default=None, metadata={"help": "Force the number of KV blocks (testing, tuning)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the global random generator."})
    load_format: str = field(
        default="auto",
        metadata={
            "help": "auto (the checkpoint's weights) | dummy (random weights: benchmarks of a "
            "shape from its config.json alone)."
        },
    )
    device: str = field(default="auto", metadata={"help": "cpu | cuda | auto."})
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model name reported in outputs (default: --model)."}
    )
    generation_config: str = field(
        default="auto",
        metadata={
            "help": "auto (the model's generation_config.json defaults) | vllm (none) | a "
            "directory holding generation_config.json."
        },
    )
    max_logprobs: int = field(
        default=20, metadata={"help": "Most logprobs a request may ask for per token."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "Tensor parallel size (1)."})
    enforce_eager: bool = field(
        default=False,
        metadata={"help": "Run every step eagerly: no CUDA graphs (same tokens, slower decode)."},
    )
    attention_backend: str = field(
        default="auto",
        metadata={"help": "auto | torch | triton (auto: triton on a GPU, torch on the CPU)."},
    )
    moe_backend: str = field(
        default="auto",
        metadata={
            "help": "Expert backend: auto | torch | triton | native (auto: triton on a GPU; on "
            "the CPU the native CPU expert engine when built, else torch)."
        },
    )
    cpu_moe: bool = field(
        default=False,
        metadata={"help": "Keep every routed expert in host RAM, run by the CPU expert engine."},
    )
    n_cpu_moe: int | None = field(
        default=None,
        metadata={"help": "Keep the routed experts of the first N MoE layers in host RAM."},
    )
    moe_gpu_layers: str | None = field(
        default=None,
        metadata={
            "help": "MoE layers whose experts stay whole in VRAM, e.g. 0-5,40; the other "
            "layers' routed experts go to host RAM."
        },
    )
    moe_vram_budget: str | None = field(
        default=None,
        metadata={
            "help": "auto | GiB: VRAM for the weights; the dense part first, then whole expert "
            "layers while they fit, the rest in host RAM (auto: what the KV reservation for "
            "one max_model_len sequence and the activations leave)."
        },
    )
    moe_cpu_dtype: str = field(
        default="keep",
        metadata={
            "help": "Format of host-resident experts: keep (the checkpoint's own: its int4 "
            "groups or FP8 blocks, else the model dtype) | bf16 | fp8 (e4m3, a scale per group) "
            "| int8 (per channel) | int4 (symmetric, per group)."
        },
    )
    moe_cpu_group_size: int = field(
        default=128, metadata={"help": "Group size of int4/fp8 host experts: 32 | 64 | 128."}
    )
    moe_cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU expert threads (default: physical cores minus 2 with a GPU, all "
            "physical cores on the CPU alone)."
        },
    )
    moe_thread_binding: str = field(
        default="core",
        metadata={
            "help": "core (each thread pinned to one physical core) | numa (to its node's cores)."
        },
    )
    moe_cpu_power_saving: bool = field(
        default=False,
        metadata={
            "help": "CPU expert threads sleep soon after a layer instead of spinning through "
            "the GPU's part of the step (less power, a few us more per layer)."
        },
    )
    gpu_prefill_min_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Forwards of at least this many tokens copy host-resident experts to the "
            "GPU layer by layer and compute them there (default: from a cost model of the "
            "measured PCIe and CPU expert speeds, printed at startup; 0: never)."
        },
    )
    gpu_prefetch_window: int = field(
        default=2,
        metadata={
            "help": "GPU prefill streaming: staging buffers in VRAM, each one host layer's "
            "experts; copies run up to N-1 layers ahead of the computing layer (0: no "
            "prefetch, copy each layer when its routing is known, only experts with tokens)."
        },
    )
    compilation_config: CompilationConfig = field(
        default_factory=CompilationConfig,
        metadata={"help": 'JSON, e.g. \'{"cudagraph_mode": "none"}\' (YAML: dotted keys).'},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Not supported: twinfer never runs code from a model."}
    )

    def __post_init__(self) -> None:
        self.compilation_config = CompilationConfig.from_value(self.compilation_config)
        if self.trust_remote_code:
            raise ValueError(
                "twinfer never runs code shipped with a model, so --trust-remote-code is not "
                "supported; use a model whose architecture twinfer implements."
            )
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype {self.dtype!r} is unknown; choose one of {', '.join(_DTYPES)}."
            )
        if self.device not in _DEVICES:
            raise ValueError(f"device {self.device!r} is unknown; choose one of {_DEVICES}.")
        if self.quantization is not None and self.quantization not in ONLINE_METHODS:
            raise ValueError(
                f"quantization {self.quantization!r} is not an online method; choose one of "
                f"{', '.join(ONLINE_METHODS)} (a quantized checkpoint needs no flag)."
            )
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is unknown; choose one of "
                f"{', '.join(_KV_CACHE_DTYPES)}."
            )
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(
                f"load_format {self.load_format!r} is unknown; choose one of "
                f"{', '.join(_LOAD_FORMATS)}."
            )
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(
                f"block_size must be a power of two from 1 to 128, got {self.block_size}."
            )
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}; "
                "it is the fraction of the GPU's memory twinfer may use (default 0.9)."
            )
        for name, allowed in (
            ("attention_backend", _KERNEL_BACKENDS),
            ("moe_backend", _MOE_BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} {getattr(self, name)!r} is unknown; choose one of "
                    f"{', '.join(allowed)}."
                )
        self._check_moe_placement()
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be at least 1, got {self.num_gpu_blocks_override}."
            )
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} is not supported yet; use 1."
            )

    def _check_moe_placement(self) -> None:
        """The placement flags alone (counts against the model come in hybrid.placement)."""
        given = [
            flag
            for flag, value in (
                ("--cpu-moe", self.cpu_moe),
                ("--n-cpu-moe", self.n_cpu_moe is not None),
                ("--moe-gpu-layers", self.moe_gpu_layers is not None),
                ("--moe-vram-budget", self.moe_vram_budget is not None),
            )
            if value
        ]
        if len(given) > 1:
            raise ValueError(
                f"{' and '.join(given)} both say where the experts go; give only one of them."
            )
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise ValueError(f"n_cpu_moe must be at least 0, got {self.n_cpu_moe}.")
        if self.moe_gpu_layers is not None:
            parse_layer_list(self.moe_gpu_layers)
        if self.moe_vram_budget is not None:
            parse_vram_budget(self.moe_vram_budget)
        self.moe_cpu_dtype = str(self.moe_cpu_dtype).lower()
        if self.moe_cpu_dtype not in MOE_CPU_DTYPES:
            raise ValueError(
                f"moe_cpu_dtype {self.moe_cpu_dtype!r} is not a format the CPU expert engine "
                f"runs; choose one of {', '.join(MOE_CPU_DTYPES)}."
            )
        if self.moe_cpu_group_size not in _INT4_GROUP_SIZES:
            raise ValueError(
                f"moe_cpu_group_size must be one of {_INT4_GROUP_SIZES}, got "
                f"{self.moe_cpu_group_size}."
            )
        if self.gpu_prefill_min_tokens is not None and self.gpu_prefill_min_tokens < 0:
            raise ValueError(
                f"gpu_prefill_min_tokens must be at least 0 (0 turns GPU prefill streaming "
                f"off), got {self.gpu_prefill_min_tokens}."
            )
        if self.gpu_prefetch_window < 0:
            raise ValueError(
                f"gpu_prefetch_window must be at least 0, got {self.gpu_prefetch_window}."
            )
        if self.moe_cpu_threads is not None and self.moe_cpu_threads < 1:
            raise ValueError(f"moe_cpu_threads must be at least 1, got {self.moe_cpu_threads}.")
        if self.moe_thread_binding not in _THREAD_BINDINGS:
            raise ValueError(
                f"moe_thread_binding {self.moe_thread_binding!r} is unknown; choose one of "
                f"{', '.join(_THREAD_BINDINGS)}."
            )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype asked for, or None for auto (resolved against the checkpoint and device)."""
        return _DTYPES[self.dtype]

    def resolved_max_num_batched_tokens(
        self, device: torch.device, host_experts: bool = False
    ) -> int:
        """The step's token budget. NOTE: on the CPU, 256 tokens already keep every core busy
        (SmolLM2 prefill: same tokens/s at 256 and 512, and 2048 is no faster), while shorter
        steps bound the inter-token latency of running decodes and how soon an abort lands.
        With host experts streamed to a GPU for prefill, every chunk copies each host layer's
        experts once, so chunks of 8192 copy them a quarter as often as 2048 would."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if device.type == "cpu":
            return 256
        return 8192 if self.streams_prefill(device, host_experts) else 2048

    def streams_prefill(self, device: torch.device, host_experts: bool) -> bool:
        """Whether long forwards may stream host-resident experts to the GPU."""
        return device.type == "cuda" and host_experts and self.gpu_prefill_min_tokens != 0

    def resolved_backend(self, which: str, device: torch.device) -> str:
        """The kernel backend of `which` ("attention_backend" or "moe_backend") on `device`."""
        name = getattr(self, which)
        if name == "auto":
            return "triton" if device.type == "cuda" and _has_triton() else "torch"
        if name == "native":
            # NOTE: "native" places the experts (in host RAM, on the CPU expert engine, see
            # hybrid/placement.py); layers left on the device use the device's backend.
            if device.type == "cuda":
                raise ValueError(
                    "--moe-backend native is the CPU-only mode's expert engine; on a GPU "
                    "machine put experts on it with --cpu-moe or --n-cpu-moe N."
                )
            return "torch"
        if name == "triton" and device.type != "cuda":
            raise ValueError(
                f"--{which.replace('_', '-')} triton needs a CUDA GPU; use torch on the CPU."
            )
        if name == "triton" and not _has_triton():
            raise ValueError(
                f"--{which.replace('_', '-')} triton needs the triton package: pip install triton."
            )
        return name

    def resolved_kv_cache_dtype(
        self, model_dtype: torch.dtype, attention_backend: str
    ) -> torch.dtype:
        """The KV cache's element type; fp8 needs an attention backend that reads it."""
        dtype = _KV_CACHE_DTYPES[self.kv_cache_dtype]
        if dtype is None:
            return model_dtype
        if attention_backend not in ("torch", "triton"):
            raise ValueError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is read by the torch and triton "
                f"attention backends, not by {attention_backend}; choose one of them with "
                "--attention-backend or keep --kv-cache-dtype auto."
            )
        return dtype

    def use_cuda_graphs(self, device: torch.device) -> bool:
        """Decode steps replay CUDA graphs unless eager is forced (needs graph-safe kernels)."""
        return (
            device.type == "cuda"
            and not self.enforce_eager
            and self.compilation_config.cudagraph_mode != "none"
        )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device cuda was asked for but no CUDA GPU is visible; use --device cpu."
            )
        return torch.device(self.device)

    # ---- CLI ----
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One `--flag-name` per field, vLLM spelling; booleans get `--no-...` forms."""
        add_dataclass_args(
            parser,
            cls,
            "engine",
            skip,
            choices={
                "dtype": list(_DTYPES),
                "device": list(_DEVICES),
                "attention_backend": list(_KERNEL_BACKENDS),
                "moe_backend": list(_MOE_BACKENDS),
                "moe_cpu_dtype": list(MOE_CPU_DTYPES),
                "moe_thread_binding": list(_THREAD_BINDINGS),
                "load_format": list(_LOAD_FORMATS),
                "kv_cache_dtype": list(_KV_CACHE_DTYPES),
                "quantization": list(ONLINE_METHODS),
            },
            types={"compilation_config": CompilationConfig.from_value},
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"unknown engine argument(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(names))}."
            )
        return cls(**kwargs)


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    skip: tuple[str, ...] = (),
    choices: dict[str, list[str]] | None = None,
    types: dict[str, Any] | None = None,
) -> None:
    """A `--flag-name` per dataclass field, typed from its annotation, help from its metadata."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": default,
            "help": f.metadata.get("help"),
        }
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = (types or {}).get(f.name) or _ARG_TYPES.get(f.type, str)
        if f.name in (choices or {}):
            kwargs["choices"] = choices[f.name]
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


_ARG_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float}


def config_file_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """`--config FILE.yaml` as parser defaults: keys are flag names (dashes or underscores),
    nested settings as mappings or dotted keys (`compilation_config.cudagraph_mode: none`).

    Unknown keys are errors that name them; flags given on the command line still win, since
    these only replace the defaults.
    """
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"cannot read --config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of flag names to values.")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        head, _, rest = key.partition(".")
        if head not in actions:
            raise ValueError(f"unknown key {raw_key!r} in --config {path}; use the flag names.")
        if rest:  # dotted: one setting of a nested config
            values.setdefault(head, {})[rest] = value
            continue
        action = actions[head]
        if isinstance(value, str) and action.type is not None and action.type is not str:
            try:
                value = action.type(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"--config {path}: {raw_key}: {exc}") from exc
        if (
            action.type in (int, float)
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int | float))
        ):
            raise ValueError(f"--config {path}: {raw_key} must be a number, got {value!r}.")
        if isinstance(action, argparse.BooleanOptionalAction) and not isinstance(value, bool):
            raise ValueError(f"--config {path}: {raw_key} must be true or false, got {value!r}.")
        if action.choices is not None and value not in action.choices:
            raise ValueError(
                f"--config {path}: {raw_key} must be one of {', '.join(map(str, action.choices))}."
            )
        if isinstance(value, dict) and head in values:
            values[head].update(value)
        else:
            values[head] = value
    for head, value in values.items():
        convert = actions[head].type
        if isinstance(value, dict) and convert is not None:
            values[head] = convert(value)  # e.g. CompilationConfig.from_value names bad sub-keys
    return values


def parse_layer_list(text: str) -> list[int]:
    """'0-5,40' -> [0, 1, 2, 3, 4, 5, 40] (sorted, unique); a clear error on anything else."""
    layers: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(
                f"moe_gpu_layers {text!r} is not a list of layers; write e.g. 0-5,40."
            ) from None
        if first < 0 or last < first:
            raise ValueError(
                f"moe_gpu_layers {text!r}: {part!r} is not a layer or an ascending range."
            )
        layers.update(range(first, last + 1))
    return sorted(layers)


def parse_vram_budget(text: str) -> float | None:
    """'auto' -> None; '20' or '20GiB' -> 20.0 (GiB); a clear error otherwise."""
    value = str(text).strip().lower()
    if value == "auto":
        return None
    try:
        gib = float(value.removesuffix("gib").removesuffix("gb"))
    except ValueError:
        raise ValueError(
            f"moe_vram_budget {text!r} is neither auto nor a number of GiB; write e.g. 20."
        ) from None
    if gib <= 0:
        raise ValueError(f"moe_vram_budget must be positive, got {text!r}.")
    return gib


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
