"""EngineConfig: every engine setting under its vLLM flag name, validated with clear errors."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

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
    max_num_batched_tokens: int = field(
        default=2048, metadata={"help": "Token budget of one step (longer prompts are chunked)."}
    )
    block_size: int = field(default=16, metadata={"help": "Tokens per KV cache block."})
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "Reuse the KV cache of shared prompt prefixes."}
    )
    kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Bytes for the KV cache on the CPU (default: enough for max_num_seqs "
            "sequences of max_model_len, at most 1 GiB)."
        },
    )
    num_gpu_blocks_override: int | None = field(
        default=None, metadata={"help": "Force the number of KV blocks (testing, tuning)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the global random generator."})
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
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Not supported: twinfer never runs code from a model."}
    )

    def __post_init__(self) -> None:
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
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(
                f"block_size must be a power of two from 1 to 128, got {self.block_size}."
            )
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}.")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be at least 1, got {self.num_gpu_blocks_override}."
            )
        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} is not supported yet; use 1."
            )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype asked for, or None for auto (resolved against the checkpoint and device)."""
        return _DTYPES[self.dtype]

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
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {
                "dest": f.name,
                "default": f.default,
                "help": f.metadata.get("help"),
            }
            if f.type == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif f.type in ("int", "int | None"):
                kwargs["type"] = int
            else:
                kwargs["type"] = str
            if f.name == "dtype":
                kwargs["choices"] = list(_DTYPES)
            elif f.name == "device":
                kwargs["choices"] = list(_DEVICES)
            group.add_argument(flag, **kwargs)

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
