"""Helpers of the training-stage tests (latents, loop, checkpoints, resume): a tiny train set, small fast
settings, a training run on the shared data set and LoRA comparisons.

Plain functions, imported by the tests (their fixtures are in ``training/conftest.py`` and the root
``conftest.py``, which registers this module for pytest's assertion rewriting). Everything runs on the CPU
with the tiny SD-shaped model at 128 px (16×16 latents), so a training step takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.device import DeviceInfo, choose_device
from shoe_lora_pipeline.core.models import SDComponents
from shoe_lora_pipeline.core.training import TrainingResult, train_lora

RESOLUTION = 128
NUM_IMAGES = 6
COLOURS = ["black", "brown", "white", "blue", "red", "grey", "green", "beige"]


def draw_shoe(index: int, resolution: int = RESOLUTION) -> Image.Image:
    """A different blob per index on white, enough for the VAE to give distinct latents."""
    img = Image.new("RGB", (resolution, resolution), "white")
    d = ImageDraw.Draw(img)
    s = resolution / 128
    d.ellipse(
        (10 * s + index * 4, 50 * s, 110 * s, 90 * s + index), fill=(37 * index % 256, 90, 200 - 20 * index)
    )
    d.rectangle((20 * s, 85 * s, 100 * s, 95 * s), fill=(20 + 10 * index, 20, 20))
    return img


def make_train_set(root: Path, n: int = NUM_IMAGES, resolution: int = RESOLUTION) -> Path:
    """``root/train/images/*.png`` + ``root/train/captions.json`` in the data stage's layout."""
    train = Path(root) / "train"
    (train / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        add_image(train, i, resolution, entries)
    (train / "captions.json").write_text(json.dumps(entries, indent=2))
    return train


def add_image(train: Path, i: int, resolution: int, entries: list[dict[str, Any]] | None = None) -> str:
    name = f"{10001 + i}.png"
    draw_shoe(i, resolution).save(train / "images" / name)
    entry = {
        "image_file": name,
        "caption": f"A professional product photo of {COLOURS[i % len(COLOURS)]} casual shoes on white "
        "background, side view, product photography",
        "metadata": {"original_size": [resolution, resolution], "processed": True, "source_sha256": "0" * 64},
    }
    if entries is None:
        entries = json.loads((train / "captions.json").read_text())
        entries.append(entry)
        (train / "captions.json").write_text(json.dumps(entries, indent=2))
    else:
        entries.append(entry)
    return name


def make_cfg(root: Path, **training: Any) -> PipelineConfig:
    """Small, fast settings; ``training`` overrides any TrainingConfig field."""
    base: dict[str, Any] = {
        "output_dir": Path(root) / "lora",
        "train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "lora_rank": 4,
        "lora_alpha": 8,
        "gradient_checkpointing": False,
        "checkpointing_steps": 2,
        "validation_steps": 1000,  # only the final validation unless a test asks
        "num_validation_images": 1,
        "validation_inference_steps": 2,
        "validation_prompts": ["A professional product photo of black casual shoes on white background"],
        "latent_encoding_batch_size": 4,
        "log_every_steps": 1,
        "seed": 42,
    }
    base.update(training)
    return PipelineConfig(
        dataset={"raw_dir": Path(root), "output_dir": Path(root), "resolution": RESOLUTION},
        training=base,
    )


def lora_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint_dir) / "pytorch_lora_weights.safetensors"))


def cpu() -> DeviceInfo:
    return choose_device("cpu", "no")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread, restoring the previous setting afterwards.

    The tiny model's ops are too small to gain from a second thread, and on a shared 2-core machine two
    busy processes with 2 OpenMP threads each slowed a step ~10x (spinning threads). Every run that a test
    compares bit for bit goes through here, so all of them use the same thread count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keep_last(split: Path, n: int) -> Path:
    """Drop all but the last ``n`` images of a split folder made by make_train_set."""
    entries = json.loads((split / "captions.json").read_text())
    for e in entries[:-n]:
        (split / "images" / e["image_file"]).unlink()
    (split / "captions.json").write_text(json.dumps(entries[-n:], indent=2))
    return split


def run_training(
    cfg: PipelineConfig, components: SDComponents, data: dict[str, Any], **kwargs: Any
) -> TrainingResult:
    """train_lora on the shared data set; ``with_val=True`` also measures the validation loss."""
    if kwargs.pop("with_val", False):
        kwargs |= {"val_dir": data["val"], "val_latents_dir": data["val_latents"]}
    return train_lora(
        cfg,
        components,
        kwargs.pop("device_info", cpu()),
        train_dir=data["train"],
        latents_dir=data["latents"],
        output_dir=cfg.training.output_dir,
        dataset_fingerprint=data["fingerprint"],
        **kwargs,
    )


RESUME_SETTINGS = {
    "max_train_steps": 8,
    "checkpointing_steps": 2,
    "checkpoints_total_limit": 10,
    "lr_warmup_steps": 3,
}


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} LoRA tensors differ, e.g. {differing[:3]}"


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ‖a − b‖ / ‖b‖ over the LoRA tensors (runs that differ only in float summation order)."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)
