"""The training side of the graph on tiny-sdxl, in-process: raw photos → cleaned → captions → splits →
latent cache (both encoders + pooled) → LoRA training with SDXL's added conditions and validation images."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from shoe_lora_pipeline.assets import category_assets
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR

pytestmark = pytest.mark.slow

TRAINING_SIDE = [
    "raw_images",
    "cleaned_images",
    "captions",
    "dataset_splits",
    "training_latents",
    "lora_training",
]


def sdxl_config(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    for p in [*sorted(DEMO_RAW_DIR.glob("100*.jpg"))[:10], DEMO_RAW_DIR / "styles.csv"]:
        shutil.copy2(p, raw / p.name)
    cfg = tmp_path / "sdxl.yaml"
    cfg.write_text(
        f"""
dataset:
  name: casual_shoes
  raw_dir: {raw}
  output_dir: out/casual_shoes
  resolution: 64
  min_valid_ratio: 0.5
  cleaning: {{workers: 1, min_side: 64, resize_policy: crop}}
  splits: {{train: 0.6, val: 0.2, test: 0.2}}
training:
  base_model: tiny-sdxl
  model_family: sdxl
  output_dir: out/casual_shoes/lora
  train_batch_size: 2
  gradient_accumulation_steps: 2
  max_train_steps: 2
  learning_rate: 1.0e-3
  lr_warmup_steps: 1
  gradient_checkpointing: false
  checkpointing_steps: 2
  validation_steps: 2
  num_validation_images: 1
  validation_inference_steps: 2
  caption_dropout: 0.2
device: cpu
"""
    )
    return cfg


def test_training_side_of_the_graph_on_tiny_sdxl(tmp_path: Path, tiny_sdxl_cache: Path) -> None:
    resources = {
        "pipeline_config": PipelineConfigResource(config_path=str(sdxl_config(tmp_path))),
        "device": DeviceResource(),
        "base_model": BaseModelResource(cache_dir=str(tiny_sdxl_cache)),
    }
    result = dg.materialize(category_assets("casual_shoes", TRAINING_SIDE), resources=resources)
    assert result.success
    mats = {m.asset_key.path[-1]: m.materialization for m in result.get_asset_materialization_events()}
    assert set(mats) == set(TRAINING_SIDE)
    latents = mats["training_latents"].metadata
    assert latents["embedding_shape"].value == "[77, 64]"  # both encoders' hidden states side by side
    training = mats["lora_training"].metadata
    assert training["global_step"].value == 2 and training["val_loss"].value > 0
    assert training["model_family"].value == "sdxl"
    assert "data:image/png;base64," in training["validation_grid"].value

    out = tmp_path / "out" / "casual_shoes"
    index = json.loads((out / "lora" / "latent_cache" / "index.json").read_text())
    assert index["pooled_shape"] == [32] and index["base_model"]["family"] == "sdxl"
    # The size conditioning comes from captions.json's metadata.original_size (the cleaning stage's).
    entries = json.loads((out / "train" / "captions.json").read_text())
    assert all(len(e["metadata"]["original_size"]) == 2 for e in entries)
    log = (out / "lora" / "training_log_full.txt").read_text()
    assert "Base model family = sdxl" in log and "resize_policy crop" in log
    state = json.loads((out / "lora" / "checkpoints" / "checkpoint-2" / "training_state.json").read_text())
    assert state["base_model"]["family"] == "sdxl" and state["training_config"]["model_family"] == "sdxl"
