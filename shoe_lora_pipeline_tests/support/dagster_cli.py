"""The command line that materialises assets as a user would, in one place (``dg launch``; run it from the
repository root, where ``[tool.dg]`` in pyproject.toml names the definitions)."""

from __future__ import annotations

from pathlib import Path

from shoe_lora_pipeline_tests.support.dagster_server import dg_command


def materialize_command(select: str, run_config: Path | None = None) -> list[str]:
    """``dg launch --assets`` of ``select`` (it materialises in this process, like ``dagster asset materialize``)."""
    command = dg_command("launch", "--assets", select)
    return [*command, "-c", str(run_config)] if run_config else command
