"""The benchmark model in the weight formats checkpoints ship in (block FP8, compressed-tensors
INT4), for the benchmarks of those formats.

`with_format` gives a copy of a model directory whose config.json carries the format's
`quantization_config`: with `--load-format dummy` the model is then built in that format (its
packed integers, FP8 bytes and scales filled with noise), the path a published checkpoint takes
minus the disk. `write_fp8_checkpoint` writes real FP8 safetensors, for the load benchmark.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch

# The linear weights the formats quantize: every projection and expert matrix; embeddings, norms,
# routers and the LM head stay in the model dtype (as DeepSeek / Qwen FP8 releases keep them).
_QUANTIZED = re.compile(
    r".*\.(q|k|v|o|gate|up|down)_proj\.weight$|.*\.experts\.\d+\.w[123]\.weight$"
)

FP8_BLOCK = (128, 128)
CHECKPOINT_FORMATS: dict[str, dict[str, Any]] = {
    "fp8": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(FP8_BLOCK),
    },
    "ct_int4": {  # llm-compressor's W4A16 "AWQ 4bit" releases: symmetric int4, groups of 32
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 32,
                },  # fmt: skip
            }
        },
        "ignore": ["lm_head", "re:.*mlp\\.gate$"],
    },
}


def with_format(model_dir: str | Path, fmt: str, out: Path) -> Path:
    """A copy of `model_dir` (config, tokenizer; no weights) announcing format `fmt`."""
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"unknown checkpoint format {fmt!r}; choose from {list(CHECKPOINT_FORMATS)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = CHECKPOINT_FORMATS[fmt]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_fp8_checkpoint(
    model_dir: str | Path, out: Path, max_shard_bytes: int, block: tuple[int, int] = FP8_BLOCK
) -> int:
    """Write `model_dir`'s model (config and tokenizer there) as a block-FP8 checkpoint with
    random values into `out`; returns its bytes.

    NOTE: the values come from one random pool (windows of it, no copies): load time and memory
    do not depend on them. FP8 bytes avoid e4m3's NaN codes (0x7f, 0xff).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from twinfer.bench.random_model import tensor_specs

    with_format(model_dir, "fp8", out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["weight_block_size"] = list(block)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    config = AutoConfig.from_pretrained(out)
    pool = torch.randint(0, 0x7F, (1 << 26,), dtype=torch.uint8, generator=_gen())
    pool |= torch.randint(0, 2, pool.shape, dtype=torch.uint8, generator=_gen()) << 7
    plain = (torch.randn(1 << 24, generator=_gen()) * 0.02).bfloat16()
    shard: dict[str, torch.Tensor] = {}
    size, total, names = 0, 0, []

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        names.append((name, list(shard)))
        shard, size = {}, 0

    for spec in tensor_specs(config):
        n = spec.numel
        if _QUANTIZED.match(spec.name):
            rows, cols = spec.shape
            shard[spec.name] = (
                # a copy: safetensors writes no tensors that share memory
                _window(pool, n, spec.name).clone().view(torch.float8_e4m3fn).view(rows, cols)
            )
            blocks = (-(-rows // block[0]), -(-cols // block[1]))
            shard[spec.name.removesuffix("weight") + "weight_scale_inv"] = torch.full(blocks, 2e-5)
            nbytes = n + 4 * blocks[0] * blocks[1]
        else:
            values = _window(plain, n, spec.name).view(spec.shape)
            shard[spec.name] = values + 1.0 if spec.mean == 1.0 else values.clone()  # norms ~1
            nbytes = 2 * n
        size += nbytes
        total += nbytes
        if size >= max_shard_bytes:
            flush()
    if shard:
        flush()
    index = {
        "metadata": {"total_size": total},
        "weight_map": {t: name for name, tensors in names for t in tensors},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index) + "\n")
    return total


def _window(pool: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """n values of `pool` from an offset hashed from `name` (the pool repeated if it is short)."""
    if n > pool.numel():
        return pool.repeat(-(-n // pool.numel()))[:n]
    return pool[zlib.crc32(name.encode()) % (pool.numel() - n + 1) :][:n]


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
