"""Where the repository and its demo photos are, for tests that read them or run commands from the root."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_RAW_DIR = REPO_ROOT / "data" / "casual_shoes" / "raw"
