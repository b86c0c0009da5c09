"""Run the `twinfer` command in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys


def run_twinfer(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twinfer.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
