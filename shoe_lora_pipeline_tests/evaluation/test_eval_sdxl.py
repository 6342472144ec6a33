"""evaluate() on tiny-sdxl: the base folder loads as StableDiffusionXLPipeline, the exported SDXL LoRA as an
adapter on it and the fused final_pipeline as its own SDXL pipeline; the same seeds give the same images
through both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.config import EvaluationConfig
from shoe_lora_pipeline.core.evaluation.runner import load_pipeline
from shoe_lora_pipeline.core.models import tiny_sdxl_path
from shoe_lora_pipeline_tests.evaluation.test_eval_report import write_training_outputs
from shoe_lora_pipeline_tests.support.evaluation import random_cnn, varied_shoes
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint


@pytest.mark.slow
def test_evaluate_an_sdxl_lora_and_its_fused_pipeline(tiny_sdxl_cache: Path, tmp_path: Path) -> None:
    from shoe_lora_pipeline.core.evaluation import evaluate

    base = tiny_sdxl_path(tiny_sdxl_cache)
    assert type(load_pipeline(base, torch.device("cpu"))).__name__ == "StableDiffusionXLPipeline"
    ckpt, _ = make_training_checkpoint(tmp_path / "train", base, rank=4, alpha=8, base_model="tiny-sdxl")
    lora_dir = tmp_path / "lora_weights"
    lora_io.export_lora(ckpt, lora_dir, dataset_name="casual_shoes", provenance={})
    fused = lora_io.fuse_lora_pipeline(base, lora_dir, tmp_path / "final_pipeline")
    data = tmp_path / "dataset"
    for split in ("test", "train"):
        (data / split / "images").mkdir(parents=True)
        for i, img in enumerate(varied_shoes()):
            img.save(data / split / "images" / f"{split}{i}.png")
    cfg = EvaluationConfig(
        prompts=["A photo of red sneakers on white background"],
        num_inference_steps=2,
        images_per_prompt=2,
        resolution=64,
    )
    results = {}
    for name, lora in (("adapter", lora_dir), ("fused", fused)):
        out = tmp_path / name
        write_training_outputs(out)
        results[name] = evaluate(
            lora=lora,
            base=base,
            config=cfg,
            test_dir=data / "test",
            train_dir=data / "train",
            training_output_dir=out,
            device="cpu",
            feature_extractor=random_cnn(),
        )
    for a, f in zip(results["adapter"].generated_lora, results["fused"].generated_lora, strict=True):
        with Image.open(a.path) as ia, Image.open(f.path) as fi:
            assert ia.size == (64, 64)
            assert np.abs(np.asarray(ia, float) - np.asarray(fi, float)).max() <= 2  # same seed, same image
    for b, lo in zip(results["adapter"].generated_base, results["adapter"].generated_lora, strict=True):
        with Image.open(b.path) as ib, Image.open(lo.path) as il:
            assert np.abs(np.asarray(ib, float) - np.asarray(il, float)).mean() > 0.5  # the LoRA acts
    assert results["adapter"].metrics_lora["fid"].status == "ok"
    assert results["adapter"].paths.report_html.is_file()
