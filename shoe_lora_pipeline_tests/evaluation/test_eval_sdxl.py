"""evaluate() on tiny-sdxl: the base folder loads as StableDiffusionXLPipeline and the exported SDXL LoRA as
an adapter on it (the fused final_pipeline is evaluated in dagster/test_pipeline_e2e_sdxl.py, and gives the
same images as the adapter: export/test_lora_equivalence_sdxl.py)."""

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
def test_evaluate_an_sdxl_lora_on_its_base_model(tiny_sdxl_cache: Path, tmp_path: Path) -> None:
    from shoe_lora_pipeline.core.evaluation import evaluate

    base = tiny_sdxl_path(tiny_sdxl_cache)
    assert type(load_pipeline(base, torch.device("cpu"))).__name__ == "StableDiffusionXLPipeline"
    ckpt, _ = make_training_checkpoint(tmp_path / "train", base, rank=4, alpha=8, base_model="tiny-sdxl")
    lora_dir = tmp_path / "lora_weights"
    lora_io.export_lora(ckpt, lora_dir, dataset_name="casual_shoes", provenance={})
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
    out = tmp_path / "run"
    write_training_outputs(out)
    result = evaluate(
        lora=lora_dir,
        base=base,
        config=cfg,
        test_dir=data / "test",
        train_dir=data / "train",
        training_output_dir=out,
        device="cpu",
        feature_extractor=random_cnn(),
    )
    for b, lo in zip(result.generated_base, result.generated_lora, strict=True):
        assert (b.seed, b.prompt_index) == (lo.seed, lo.prompt_index)
        with Image.open(b.path) as ib, Image.open(lo.path) as il:
            assert ib.size == il.size == (64, 64)
            assert np.abs(np.asarray(ib, float) - np.asarray(il, float)).mean() > 0.5  # the LoRA acts
    assert result.metrics_lora["fid"].status == "ok" and result.paths.report_html.is_file()
