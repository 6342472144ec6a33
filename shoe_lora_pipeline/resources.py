"""Dagster resources: pipeline config, device and base model. The only place they are defined.

Each resource is a thin shell over the framework-free core (``shoe_lora_pipeline.core``). Values can be
overridden per run from the Dagster launchpad, e.g.::

    resources:
      pipeline_config:
        config:
          config_path: configs/casual_shoes_sd15.yaml
          overrides: ["training.max_train_steps=1000"]
      device:
        config: {device: cuda}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field, PrivateAttr

from shoe_lora_pipeline.core.config import CONFIG_ENV_VAR, PipelineConfig, load_config

if TYPE_CHECKING:  # torch-heavy: imported where used, so the data steps never load torch
    from shoe_lora_pipeline.core.device import DeviceInfo
    from shoe_lora_pipeline.core.models import SDComponents


class PipelineConfigResource(dg.ConfigurableResource):
    """The pipeline configuration (a YAML file under configs/, plus per-run overrides)."""

    config_path: str = Field(
        default="",
        description=f"YAML config file; empty = ${CONFIG_ENV_VAR} or configs/demo.yaml.",
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="Dotted overrides applied on top of the file, e.g. 'training.max_train_steps=100'.",
    )

    _config: PipelineConfig | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Validate before any asset body runs: a bad key or value fails the run at once, naming it.
        self._config = load_config(self.config_path or None, overrides=self.overrides)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        # The category folder locks this run's steps took in this process (assets/_category.py).
        from shoe_lora_pipeline.core.category_lock import release_run

        if context.run is not None:
            release_run(context.run.run_id)

    def get(self, category: str | None = None) -> PipelineConfig:
        """The whole configuration, or one product category's (its dataset and output folders)."""
        if self._config is None:
            self._config = load_config(self.config_path or None, overrides=self.overrides)
        return self._config if category is None else self._config.for_category(category)


class DeviceResource(dg.ConfigurableResource):
    """Where training and generation run: MPS, then CUDA, then CPU (or as configured)."""

    device: str = Field(default="", description="auto|mps|cuda|cpu; empty = the config file's `device`.")
    gpu_lock_dir: str = Field(
        default="",
        description="Folder of the per-GPU lock files that pin each training child to free GPUs "
        "(launcher accelerate); empty = $SHOE_LORA_GPU_LOCKS or <tmp>/shoe_lora_gpu_locks.",
    )

    def resolve(self, cfg: PipelineConfig) -> DeviceInfo:
        from shoe_lora_pipeline.core.device import choose_device

        return choose_device(self.device or cfg.device, cfg.training.mixed_precision)


class BaseModelResource(dg.ConfigurableResource):
    """The Stable Diffusion base model named by ``training.base_model`` (hub id, folder, tiny-sd or
    tiny-sdxl), of the family ``training.model_family`` insists on (or the one its config says)."""

    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("SHOE_LORA_CACHE", ""),
        description="Where the built tiny-sd / tiny-sdxl models are cached; empty = ~/.cache/shoe_lora_pipeline.",
    )

    def _cache(self) -> Path | None:
        return Path(self.cache_dir) if self.cache_dir else None

    def load(self, cfg: PipelineConfig, device: DeviceInfo) -> SDComponents:
        from shoe_lora_pipeline.core.models import load_base_model

        return load_base_model(
            cfg.training.base_model,
            revision=cfg.training.revision,
            cache_dir=self._cache(),
            dtype=device.weight_dtype,
            model_family=cfg.training.model_family,
            vae=cfg.training.vae,
        )

    def folder(self, cfg: PipelineConfig) -> Path:
        """The base model's diffusers folder (built or found in the cache first)."""
        from shoe_lora_pipeline.core.models import resolve_base_model

        return resolve_base_model(cfg.training.base_model, cfg.training.revision, self._cache())

    def identity(self, cfg: PipelineConfig) -> dict[str, str | None]:
        """The base model's resolved identity (id, revision, fingerprint), as :meth:`load` records it on
        the components and checkpoints and provenance.json carry it."""
        from shoe_lora_pipeline.core.models import base_model_identity

        return base_model_identity(
            cfg.training.base_model, self.folder(cfg), cfg.training.revision, cfg.training.vae
        )


def default_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "pipeline_config": PipelineConfigResource(),
        "device": DeviceResource(),
        "base_model": BaseModelResource(),
    }
