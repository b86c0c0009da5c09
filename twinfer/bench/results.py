"""Benchmark results: one JSON per figure under bench/results/, with its bound and context."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__}


def git_commit() -> str:
    """The commit measured: $TWINFER_COMMIT when set (a copied tree's git metadata can be stale,
    as on a lent GPU machine), else `git rev-parse`."""
    if os.environ.get("TWINFER_COMMIT"):
        return os.environ["TWINFER_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(
    out_dir: Path,
    benchmark: str,
    value: float,
    unit: str,
    bound: float,
    config: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Print the figure next to its physical bound and save it as `<benchmark>.json`."""
    result = {
        "benchmark": benchmark,
        "value": round(value, 3),
        "unit": unit,
        "bound": round(bound, 3),
        "ratio": round(value / bound, 4) if bound else None,
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "config": config,
        **extra,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{benchmark}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{benchmark}: {value:.2f} {unit} | bound {bound:.2f} {unit} | ratio {result['ratio']}"
        + "".join(f" | {k} {v}" for k, v in extra.items() if isinstance(v, int | float))
    )
    return result
