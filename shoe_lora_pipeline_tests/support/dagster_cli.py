"""The command line that materialises assets as a user would, in one place (the ``dagster`` CLI today)."""

from __future__ import annotations

import sys
from pathlib import Path


def materialize_command(select: str, run_config: Path | None = None) -> list[str]:
    """``dagster asset materialize`` of ``select`` from this project's definitions."""
    command = [
        sys.executable,
        "-m",
        "dagster",
        "asset",
        "materialize",
        "-m",
        "shoe_lora_pipeline.definitions",
    ]
    command += ["--select", select]
    return [*command, "-c", str(run_config)] if run_config else command
