"""Fixtures that tests in several folders use: the tiny model (built once per session) and a loader of
fresh copies of it. Tests never touch the network, the user's cache or the repository's outputs.

The helpers under ``support/`` are plain modules that the tests import. They are registered here, before
anything imports them, so that pytest rewrites their ``assert`` statements too (by itself pytest rewrites
only test modules and conftest files).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.models import SDComponents

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytest.register_assert_rewrite("shoe_lora_pipeline_tests.support")


@pytest.fixture(scope="session")
def tiny_sd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the tiny SD model, built once per test session (~5 s)."""
    from shoe_lora_pipeline.core.models import tiny_sd_path
    from shoe_lora_pipeline_tests.support.training import one_torch_thread

    cache = tmp_path_factory.mktemp("tiny-sd-cache")
    with one_torch_thread():
        tiny_sd_path(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_sdxl_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the tiny SDXL model, built once per test session."""
    from shoe_lora_pipeline.core.models import tiny_sdxl_path
    from shoe_lora_pipeline_tests.support.training import one_torch_thread

    cache = tmp_path_factory.mktemp("tiny-sdxl-cache")
    with one_torch_thread():
        tiny_sdxl_path(cache)
    return cache


@pytest.fixture
def load_components(tiny_sd_cache: Path) -> Iterator[Callable[[], SDComponents]]:
    """Factory of freshly loaded tiny-model components (frozen; a test may change its own copy, as
    train_lora does with the UNet); torch on one thread while the test runs."""
    from shoe_lora_pipeline.core.models import load_base_model
    from shoe_lora_pipeline_tests.support.training import one_torch_thread

    def load() -> SDComponents:
        return load_base_model("tiny-sd", cache_dir=tiny_sd_cache)

    with one_torch_thread():
        yield load
