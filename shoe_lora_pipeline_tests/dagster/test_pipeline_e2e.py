"""End to end on the tiny model: every asset of the graph materialised in-process, then re-run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from shoe_lora_pipeline.assets import STAGE_NAMES, category_assets
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR

pytestmark = pytest.mark.slow


def small_demo(tmp_path: Path, n: int = 14) -> Path:
    """A few demo photos (+ styles.csv and one hostile file) so the run takes seconds, not minutes."""
    raw = tmp_path / "raw"
    raw.mkdir()
    photos = sorted(p for p in DEMO_RAW_DIR.glob("100*.jpg"))[:n]
    for p in [*photos, DEMO_RAW_DIR / "styles.csv", DEMO_RAW_DIR / "bad_truncated.jpg"]:
        shutil.copy2(p, raw / p.name)
    return raw


def e2e_config(tmp_path: Path, raw: Path) -> Path:
    cfg = tmp_path / "e2e.yaml"
    cfg.write_text(
        f"""
dataset:
  name: casual_shoes
  raw_dir: {raw}
  output_dir: out/casual_shoes
  resolution: 128
  min_valid_ratio: 0.5
  cleaning: {{workers: 1}}
  splits: {{train: 0.6, val: 0.2, test: 0.2}}
training:
  base_model: tiny-sd
  output_dir: out/casual_shoes/lora
  train_batch_size: 2
  gradient_accumulation_steps: 2
  max_train_steps: 4
  learning_rate: 1.0e-3
  lr_warmup_steps: 1
  gradient_checkpointing: false
  checkpointing_steps: 2
  validation_steps: 4
  num_validation_images: 1
  validation_inference_steps: 2
  log_every_steps: 1
evaluation:
  prompts:
    - "A professional product photo of black casual shoes on white background, side view, product photography"
    - "A professional product photo of blue casual shoes on white background, side view, product photography"
  images_per_prompt: 2
  num_inference_steps: 2
  resolution: 64
device: cpu
"""
    )
    return cfg


def test_whole_graph_on_tiny_model(tmp_path: Path, tiny_sd_cache: Path) -> None:
    cfg_path = e2e_config(tmp_path, small_demo(tmp_path))
    resources = {
        "pipeline_config": PipelineConfigResource(config_path=str(cfg_path)),
        "device": DeviceResource(),
        "base_model": BaseModelResource(cache_dir=str(tiny_sd_cache)),
    }
    result = dg.materialize(category_assets("casual_shoes"), resources=resources)
    assert result.success

    mats = {m.asset_key.path[-1]: m.materialization for m in result.get_asset_materialization_events()}
    assert set(mats) == set(STAGE_NAMES)
    training = mats["lora_training"].metadata
    assert training["global_step"].value == 4
    assert training["trainable_params"].value > 0
    assert "data:image/png;base64," in training["loss_curve"].value
    assert "data:image/png;base64," in training["validation_grid"].value
    # A fresh start says so (no -1); numbers are rounded for the page (the JSON files keep full precision).
    assert training["started"].value == "fresh start" and "resumed_from_step" not in training
    for key in ("seconds_per_step", "images_per_second", "smoothed_loss", "final_loss"):
        value = training[key].value
        assert value == float(f"{value:.4g}"), (key, value)
    summary = json.loads((tmp_path / "out" / "casual_shoes" / "lora" / "training_summary.json").read_text())
    assert summary["smoothed_loss"] == pytest.approx(training["smoothed_loss"].value, rel=1e-3)

    out = tmp_path / "out" / "casual_shoes" / "lora"
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {"checkpoint-2", "checkpoint-4"}
    # Everything the run wrote follows the umask (safetensors alone would write 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert not [
        p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.stat().st_mode & 0o666 != 0o666 & ~umask
    ]
    # the val split (cached by training_latents) gives a validation loss at the validation step
    assert (out / "latent_cache_val" / "index.json").is_file()
    assert (out / "validation_loss.csv").read_text().splitlines()[1].startswith("4,")
    assert training["val_loss"].value > 0 and training["best_val_step"].value == 4
    assert (out / "training_log_full.txt").read_text().count("Steps: ") >= 4
    weights = out / "lora_weights"
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "pytorch_lora_weights.safetensors",
        "casual_shoes_lora.safetensors",
        "README.md",
    ]:
        assert (weights / name).is_file(), name
    assert (out / "final_pipeline" / "model_index.json").is_file()

    # Every checklist check ran and reported an honest outcome (tiny random model: most do not pass).
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert {"final_loss", "white_background", "fid", "clip_score", "inception_score"} <= set(checks)
    assert not checks["fid"].passed and checks["fid"].severity == dg.AssetCheckSeverity.WARN
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["metrics"]
    assert (out / "evaluation" / "report.html").is_file()

    # The audit CLI reads the provenance straight from the exported file; the run id matches.
    kohya = weights / "casual_shoes_lora.safetensors"
    audit = subprocess.run(
        [sys.executable, "-m", "shoe_lora_pipeline.cli", "audit", str(kohya), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.run_id in audit.stdout

    # One base-model identity across the audit trail: Dagster metadata = provenance = audit = report.
    revision = json.loads(audit.stdout)["provenance"]["base_model_revision"]
    assert revision.startswith("tiny-sd-v")
    with_model = {s for s, m in mats.items() if "base_model_revision" in m.metadata}
    assert with_model == {
        "training_latents",
        "lora_training",
        "lora_weights",
        "final_pipeline",
        "evaluation_report",
    }
    assert {mats[s].metadata["base_model_revision"].value for s in with_model} == {revision}
    assert revision in (out / "evaluation" / "report.html").read_text()
    # One device form: its type as text plus the details, only on the assets that used a device.
    with_device = {s for s, m in mats.items() if "device" in m.metadata}
    assert with_device == {"training_latents", "lora_training", "evaluation_report"}
    for stage in with_device:
        assert mats[stage].metadata["device"].value == "cpu"
        assert mats[stage].metadata["device_details"].value["type"] == "cpu"

    # A second materialisation with nothing changed does not train again, and its export (as retrain_job
    # or `--select '*'` runs it) writes the very same files: only provenance.json names the new run.
    exported = {p.name: p.read_bytes() for p in weights.iterdir() if p.name != "provenance.json"}
    again = dg.materialize(
        category_assets("casual_shoes", ["lora_training", "lora_weights"]), resources=resources
    )
    meta = {m.asset_key.path[-1]: m.materialization for m in again.get_asset_materialization_events()}
    assert meta["lora_training"].metadata["skipped_already_complete"].value is True
    assert meta["lora_training"].metadata["steps_this_run"].value == 0
    assert {p.name: p.read_bytes() for p in weights.iterdir() if p.name != "provenance.json"} == exported
    assert again.run_id in (weights / "provenance.json").read_text()
