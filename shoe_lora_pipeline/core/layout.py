"""Where every stage writes, in one place, so stages, tests and the CLI agree on paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shoe_lora_pipeline.core.config import PipelineConfig

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    dataset_dir: Path  # dataset.output_dir
    training_dir: Path  # training.output_dir

    @classmethod
    def of(cls, cfg: PipelineConfig) -> Layout:
        return cls(dataset_dir=cfg.dataset.output_dir, training_dir=cfg.training.output_dir)

    # data stage
    @property
    def raw_manifest(self) -> Path:
        return self.dataset_dir / "raw_manifest.csv"

    @property
    def cleaned_dir(self) -> Path:
        return self.dataset_dir / "cleaned"

    @property
    def cleaned_images_dir(self) -> Path:
        return self.cleaned_dir / "images"

    @property
    def cleaned_manifest(self) -> Path:
        return self.cleaned_dir / "manifest.json"

    @property
    def captions_json(self) -> Path:
        return self.dataset_dir / "captions.json"

    def split_dir(self, split: str) -> Path:
        return self.dataset_dir / split

    # training stage
    @property
    def latents_dir(self) -> Path:
        return self.training_dir / "latent_cache"

    @property
    def val_latents_dir(self) -> Path:
        """The held-out ``val`` split's latents (for the validation loss during training)."""
        return self.training_dir / "latent_cache_val"

    @property
    def checkpoints_dir(self) -> Path:
        return self.training_dir / "checkpoints"

    @property
    def validation_dir(self) -> Path:
        return self.training_dir / "validation"

    @property
    def training_log(self) -> Path:
        return self.training_dir / "training_log_full.txt"

    # export and evaluation
    @property
    def lora_weights_dir(self) -> Path:
        return self.training_dir / "lora_weights"

    @property
    def final_pipeline_dir(self) -> Path:
        return self.training_dir / "final_pipeline"

    @property
    def evaluation_dir(self) -> Path:
        return self.training_dir / "evaluation"

    # product renders (everything the renders stages write is under this folder)
    @property
    def renders_dir(self) -> Path:
        return self.training_dir / "renders"
