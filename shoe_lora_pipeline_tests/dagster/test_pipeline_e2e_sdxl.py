"""End to end on tiny-sdxl with configs/demo_sdxl.yaml: raw photos → SDXL LoRA → published renders.

The demo config itself, made small (a few photos, 4 steps, 2 sampler steps, 64 px evaluation) and pointed at
temporary folders; everything else (the family it insists on, the renders sheet, the marketplace profiles,
C2PA with the local test CA) as the demo ships it.
"""

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from safetensors import safe_open

from shoe_lora_pipeline.assets import STAGE_NAMES, category_assets, render_assets
from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.config import load_config
from shoe_lora_pipeline.core.marking import TRAINED_ALGORITHMIC_MEDIA, read_marking
from shoe_lora_pipeline.core.models import base_model_identity, tiny_sdxl_path
from shoe_lora_pipeline.core.renders import parse_a1111_parameters
from shoe_lora_pipeline.definitions import RENDER_STAGE_NAMES
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.dagster.test_pipeline_e2e import small_demo
from shoe_lora_pipeline_tests.renders.test_marketplace import white_sneaker
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def small_demo_sdxl(tmp_path: Path) -> Path:
    """configs/demo_sdxl.yaml with the sizes of a test and absolute paths into ``tmp_path``."""
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "demo_sdxl.yaml").read_text())
    out = tmp_path / "out" / "casual_shoes"
    cfg["dataset"].update(
        raw_dir=str(small_demo(tmp_path)),
        output_dir=str(out),
        min_valid_ratio=0.5,
        splits={"train": 0.6, "val": 0.2, "test": 0.2},
    )
    cfg["dataset"]["cleaning"]["workers"] = 1
    cfg["training"].update(
        output_dir=str(out / "lora"),
        max_train_steps=4,
        lr_warmup_steps=1,
        checkpointing_steps=2,
        validation_steps=4,
        num_validation_images=1,
        validation_inference_steps=2,
        log_every_steps=1,
    )
    cfg["evaluation"].update(
        prompts=cfg["evaluation"]["prompts"][:2], images_per_prompt=2, num_inference_steps=2
    )
    cfg["evaluation"]["resolution"] = 64
    specs = (REPO_ROOT / "configs" / cfg["renders"]["specs_csv"]).resolve()
    cfg["renders"].update(specs_csv=str(specs), candidates_per_image=1, num_inference_steps=2)
    cfg["renders"]["require_qa_pass"] = False  # the random tiny model never passes product QA
    cfg["device"] = "cpu"
    path = tmp_path / "demo_sdxl.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_demo_sdxl_config_runs_the_whole_graph_to_published_renders(
    tmp_path: Path, tiny_sdxl_cache: Path
) -> None:
    cfg_path = small_demo_sdxl(tmp_path)
    resources: dict[str, Any] = {
        "pipeline_config": PipelineConfigResource(config_path=str(cfg_path)),
        "device": DeviceResource(),
        "base_model": BaseModelResource(cache_dir=str(tiny_sdxl_cache)),
    }
    profiles = load_config(
        cfg_path
    ).publish.resolved_profiles()  # the checks, one per profile, as in Definitions
    renders_group = render_assets("casual_shoes", profiles=profiles)
    result = dg.materialize([*category_assets("casual_shoes"), *renders_group], resources=resources)
    assert result.success
    mats = {m.asset_key.path[-1]: m.materialization for m in result.get_asset_materialization_events()}
    assert set(mats) == {*STAGE_NAMES, *RENDER_STAGE_NAMES}
    assert mats["lora_training"].metadata["global_step"].value == 4

    out = tmp_path / "out" / "casual_shoes" / "lora"
    weights = out / "lora_weights"
    header = lora_io.weights_header(weights / "casual_shoes_lora.safetensors")
    assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["ss_sd_model_name"] == "tiny-sdxl"
    kohya_keys = safe_open(str(weights / "casual_shoes_lora.safetensors"), framework="numpy").keys()
    assert all(
        k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"))
        for k in kohya_keys
    )
    index = json.loads((out / "final_pipeline" / "model_index.json").read_text())
    assert (
        index["_class_name"]
        == mats["final_pipeline"].metadata["pipeline_class"].value
        == "StableDiffusionXLPipeline"
    )
    assert (out / "evaluation" / "report.html").is_file()
    assert mats["product_renders"].metadata["pipeline"].value == "final_pipeline"

    # The demo sheet: 3 good SKUs rendered, 2 rows refused; the noise of the random model is flagged by
    # every profile's checks (hires-passed first), nothing published.
    renders = out / "renders"
    manifest = list(csv.DictReader((renders / "published" / "manifest.csv").open(encoding="utf-8")))
    assert sorted({r["sku"] for r in manifest}) == ["CS-1001", "CS-1002", "CS-1003"]
    assert all(r["hires"] == "256x256" for r in manifest)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert {"amazon_main_compliance", "google_merchant_compliance", "shopify_compliance"} <= set(checks)

    # Candidates that are product photos publish, marked and signed as the SD1.5 ones are, and their
    # A1111 parameters name the SDXL base model and its hash.
    for png in (renders / "candidates").rglob("*.png"):
        white_sneaker(1024, (250, 450, 800, 700)).save(png)
    no_hires = tmp_path / "no_hires.yaml"
    no_hires.write_text(
        cfg_path.read_text().replace("renders:\n", "renders:\n  hires:\n    enabled: false\n")
    )
    publish_only = {**resources, "pipeline_config": PipelineConfigResource(config_path=str(no_hires))}
    again = dg.materialize(render_assets("casual_shoes", profiles=profiles)[1:], resources=publish_only)
    assert all(c.passed for c in again.get_asset_check_evaluations())
    jpgs = sorted((renders / "published" / "amazon_main").rglob("*.jpg"))
    assert sorted({p.parent.name for p in jpgs}) == ["CS-1001", "CS-1002", "CS-1003"]
    fingerprint = base_model_identity("tiny-sdxl", tiny_sdxl_path(tiny_sdxl_cache))["fingerprint"]
    for jpg in jpgs:
        found = read_marking(jpg)
        assert found["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA and found["c2pa"]["present"]
        params = parse_a1111_parameters(found["parameters"])
        assert params["Model"] == "tiny-sdxl" and params["Model hash"] == fingerprint[:10]
        assert found["render"]["lora_provenance"]["base_model_family"] == "sdxl"
    assert lora_io.read_provenance(jpgs[0])["provenance"]["dagster_run_id"] == result.run_id
    shutil.rmtree(tmp_path / "out")  # ~40 MB of pipelines: do not keep them in pytest's tmp dirs
