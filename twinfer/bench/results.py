"""Benchmark results: one JSON per figure under bench/results/, with its bound and context."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

# The repository's records; benchmarks write here only when asked (--save-result), as vLLM's do.
RESULTS_DIR = Path("bench/results")


def add_result_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--save-result",
        action="store_true",
        help=f"Also write one JSON per figure into {RESULTS_DIR}/ (default: print only).",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="Write one JSON per figure into this directory (implies --save-result).",
    )


def results_dir(args: argparse.Namespace) -> Path | None:
    """Where this run's JSON goes, or None to print only."""
    if args.results_dir is not None:
        return args.results_dir
    return RESULTS_DIR if args.save_result else None


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
    out_dir: Path | None,
    benchmark: str,
    value: float,
    unit: str,
    bound: float,
    config: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Print the figure beside its physical bound; with `out_dir`, save `<benchmark>.json`."""
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
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{benchmark}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{benchmark}: {value:.2f} {unit} | bound {bound:.2f} {unit} | ratio {result['ratio']}"
        + "".join(f" | {k} {v}" for k, v in extra.items() if isinstance(v, int | float))
    )
    return result
