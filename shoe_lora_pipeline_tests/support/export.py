"""A LoRA training checkpoint written exactly as the trainer writes it (with random A *and* B, so that
format comparisons cannot pass trivially), for the export, audit, equivalence and renders tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from shoe_lora_pipeline.core.models import lora_config

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def adapted_unet(base_dir: Path, rank: int, alpha: float, seed: int = 0) -> Any:
    """A fresh tiny UNet with a LoRA whose A *and* B are random (B starts at zero in peft, which would make
    every comparison trivially pass)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet", use_safetensors=True)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, alpha, 0.0, TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return unet.eval()


def make_training_checkpoint(
    root: Path,
    base_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    step: int = 20,
    seed: int = 0,
    base_model: str = "tiny-sd",
    resolution: int = 512,
) -> tuple[Path, Any]:
    """``root`` = training.output_dir: checkpoints/checkpoint-N/, validation/, losses.csv, summary."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict
    from PIL import Image

    from shoe_lora_pipeline.core.models import base_model_identity

    unet = adapted_unet(base_dir, rank, alpha, seed)
    ckpt = root / "checkpoints" / f"checkpoint-{step}"
    cfg = lora_config(rank, alpha, 0.0, TARGETS)
    # Exactly the trainer's save call.
    StableDiffusionPipeline.save_lora_weights(
        ckpt,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
        unet_lora_adapter_metadata=cfg.to_dict(),
    )
    state = {
        "global_step": step,
        "lora": {"rank": rank, "alpha": alpha, "dropout": 0.0, "target_modules": TARGETS},
        "base_model": base_model_identity(base_model, base_dir),
        "training_hash": "train-hash-123",
        "dataset_fingerprint": "dataset-fp-456",
        # What the trainer records (recorded_training_config): the settings that produced these weights.
        "training_config": {
            "learning_rate": 1e-4,
            "lr_scheduler": "cosine",
            "train_batch_size": 2,
            "gradient_accumulation_steps": 8,
            "max_train_steps": 3000,
            "resolution": resolution,
            "lora_rank": rank,
            "lora_alpha": alpha,
            "snr_gamma": 5.0,
            "noise_offset": 0.05,
            "input_perturbation": 0.0,
            "caption_dropout": 0.1,
        },
    }
    (ckpt / "training_state.json").write_text(json.dumps(state))
    (ckpt / "validation_loss.csv").write_text(f"step,val_loss\n{step // 2},0.25\n{step},0.125\n")
    (root / "validation").mkdir(parents=True, exist_ok=True)
    for s, colour in ((step // 2, "red"), (step, "green"), (step * 2, "blue")):  # step*2: after the ckpt
        Image.new("RGB", (32, 32), colour).save(root / "validation" / f"grid_step{s:05d}.png")
    with (root / "losses.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "lr", "grad_norm", "seconds"])
        for s in range(1, step * 2 + 1):
            w.writerow([s, 0, 1.0 / s, 1e-4, 0.5, 0.1])
    (root / "training_summary.json").write_text(json.dumps({"global_step": step}))
    return ckpt, unet
