"""Lazy, memory-mapped reading of (sharded) safetensors checkpoints, with clear errors."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shard files: from model.safetensors.index.json, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{index} is not a valid safetensors index ({exc}); re-download it."
            ) from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(
                f"{model_dir} is missing shard(s) {', '.join(missing)} named by {index.name}; "
                "the download is incomplete, fetch the missing files."
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in model_dir.glob("*.bin")) or ["no weight files"]
        raise ValueError(
            f"{model_dir} has no *.safetensors weights ({', '.join(found[:3])}); twinfer reads "
            "safetensors (it never unpickles .bin files): convert the checkpoint or use a GGUF."
        )
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, one at a time, read through a memory map.

    Logs each shard as it completes (bytes so far of the total, GB/s): a large checkpoint takes
    minutes to load, and the log says how far it is."""
    total = sum(path.stat().st_size for path in files)
    done, start = 0, time.perf_counter()
    for i, path in enumerate(files, 1):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ValueError(
                f"{path} is not a valid safetensors file ({exc}); it is corrupt or truncated, "
                "re-download it."
            ) from exc
        done += path.stat().st_size
        seconds = time.perf_counter() - start
        logger.info(
            "loaded shard %d/%d: %.2f of %.2f GB (%.0f%%) at %.2f GB/s",
            i,
            len(files),
            done / 1e9,
            total / 1e9,
            100 * done / max(total, 1),
            done / 1e9 / max(seconds, 1e-9),
        )
