"""Fixtures of the training-stage tests: the shared 6-image data set with its latent caches, and the
uninterrupted 8-step run that every resume test compares with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shoe_lora_pipeline.core.latents import cache_latents
from shoe_lora_pipeline.core.models import load_base_model
from shoe_lora_pipeline.core.run_artifacts import read_losses_csv
from shoe_lora_pipeline.core.train_data import dataset_fingerprint
from shoe_lora_pipeline_tests.support.training import (
    NUM_IMAGES,
    RESOLUTION,
    RESUME_SETTINGS,
    keep_last,
    lora_tensors,
    make_cfg,
    make_train_set,
    one_torch_thread,
    run_training,
)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory, tiny_sd_cache: Path) -> dict[str, Any]:
    """A shared 6-image train set with its latent cache (tests must not modify it)."""
    root = tmp_path_factory.mktemp("dataset")
    train = make_train_set(root)
    latents = root / "latents"
    # A held-out val split of two other images, for the validation loss (passed only when a test asks).
    val = keep_last(make_train_set(root / "held_out", n=NUM_IMAGES + 2), 2)
    with one_torch_thread():
        components = load_base_model("tiny-sd", cache_dir=tiny_sd_cache)
        cache_latents(components, train, latents, RESOLUTION, 4, "cpu")
        cache_latents(components, val, root / "val_latents", RESOLUTION, 4, "cpu")
    return {
        "root": root,
        "train": train,
        "latents": latents,
        "fingerprint": dataset_fingerprint(train),
        "val": val,
        "val_latents": root / "val_latents",
    }


@pytest.fixture(scope="session")
def uninterrupted_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd_cache: Path, dataset: dict[str, Any]
) -> dict[str, Any]:
    """8 optimizer steps in one go (checkpoint every 2): the reference for every resume test."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = make_cfg(root, **RESUME_SETTINGS)
    with one_torch_thread():
        result = run_training(cfg, load_base_model("tiny-sd", cache_dir=tiny_sd_cache), dataset)
    return {
        "cfg": cfg,
        "result": result,
        "lora": lora_tensors(result.checkpoint_dir),
        "losses": read_losses_csv(result.output_dir / "losses.csv"),
    }
