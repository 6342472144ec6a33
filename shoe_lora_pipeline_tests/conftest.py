"""Shared fixtures. Tests never touch the network, the user's cache or the repository's outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_RAW_DIR = REPO_ROOT / "data" / "casual_shoes" / "raw"


@pytest.fixture(scope="session")
def tiny_sd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the tiny SD model, built once per test session."""
    from shoe_lora_pipeline.core.models import tiny_sd_path

    cache = tmp_path_factory.mktemp("tiny-sd-cache")
    tiny_sd_path(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_cache: Path):  # noqa: ANN201
    """Loaded tiny SD components (frozen). Tests that modify modules must load their own copy."""
    from shoe_lora_pipeline.core.models import load_base_model

    return load_base_model("tiny-sd", cache_dir=tiny_sd_cache)
