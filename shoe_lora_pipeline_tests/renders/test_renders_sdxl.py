"""Product renders of an SDXL LoRA (tiny-sdxl): the family's pipelines render, the hires pass runs
StableDiffusionXLImg2ImgPipeline on the same components, and published files name the SDXL model hash;
finishing and marking are the SD1.5 path's."""

import csv
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import torch

from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.marking import TRAINED_ALGORITHMIC_MEDIA, read_marking
from shoe_lora_pipeline.core.models import base_model_identity, tiny_sdxl_path
from shoe_lora_pipeline.core.renders import lora_source, parse_a1111_parameters, pipeline_loader
from shoe_lora_pipeline.core.renders.hires import HiresPass, HiresSettings, img2img_from
from shoe_lora_pipeline.definitions import render_assets
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource
from shoe_lora_pipeline_tests.renders.test_marketplace import white_sneaker
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint
from shoe_lora_pipeline_tests.support.training import one_torch_thread

SHEET = "sku,colour,type,characteristics,count,view\nXL-1,black,casual,lace-up,1,side\nXL-2,white,casual sneakers,,1,\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_cache: Path) -> Path:
    """training.output_dir with an SDXL lora_weights/ (random LoRA on tiny-sdxl) and its fused final_pipeline/."""
    root = tmp_path_factory.mktemp("lora-sdxl")
    base = tiny_sdxl_path(tiny_sdxl_cache)
    with one_torch_thread():
        ckpt, _ = make_training_checkpoint(root, base, rank=4, alpha=4, step=4, base_model="tiny-sdxl")
        provenance = {"dagster_run_id": "lora-run-xl", "dataset_name": "casual_shoes"}
        lora_io.export_lora(ckpt, root / "lora_weights", dataset_name="casual_shoes", provenance=provenance)
        lora_io.fuse_lora_pipeline(base, root / "lora_weights", root / "final_pipeline")
    return root


def test_base_plus_lora_is_an_sdxl_pipeline_and_hires_uses_sdxl_img2img(
    tmp_path: Path, exported: Path, tiny_sdxl_cache: Path
) -> None:
    source = lora_source(exported / "lora_weights", None)  # not the fused folder: base + LoRA in memory
    load = pipeline_loader(
        source, lambda: tiny_sdxl_path(tiny_sdxl_cache), torch.device("cpu"), torch.float32, sampler="euler"
    )
    with one_torch_thread():
        pipe, _ = load()
        assert type(pipe).__name__ == "StableDiffusionXLPipeline"
        img2img = img2img_from(pipe)
        assert type(img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
        assert img2img.unet is pipe.unet and img2img.text_encoder_2 is pipe.text_encoder_2
        settings = HiresSettings(scale=2.0, denoise=0.5, steps=2, guidance_scale=5.0)
        hires = HiresPass(settings, tmp_path / "hires", lambda: (pipe, []), log=lambda _: None)
        args = ("XL-1", "k" * 64, "000-abc.png", white_sneaker(64, (12, 26, 46, 44)), "white sneakers", "", 7)
        a, b = (
            hires(*args),
            HiresPass(settings, tmp_path / "again", lambda: (pipe, []), log=lambda _: None)(*args),
        )
    assert a.size == (128, 128) and np.array_equal(np.asarray(a), np.asarray(b))  # same seed, same pixels
    # The A1111 "Model hash" of the renders is the SDXL base model's.
    fingerprint = base_model_identity("tiny-sdxl", tiny_sdxl_path(tiny_sdxl_cache))["fingerprint"]
    assert source.model_hash == fingerprint[:10] and source.base_model == "tiny-sdxl"


def test_materialize_renders_and_publishes_from_the_sdxl_final_pipeline(
    tmp_path: Path, exported: Path, tiny_sdxl_cache: Path
) -> None:
    (tmp_path / "raw").mkdir()
    for name in ("lora_weights", "final_pipeline"):
        shutil.copytree(exported / name, tmp_path / "out" / "lora" / name)
    (tmp_path / "specs.csv").write_text(SHEET, encoding="utf-8")
    config = """
dataset: {name: casual_shoes, raw_dir: raw, output_dir: out, resolution: 64}
training: {base_model: tiny-sdxl, output_dir: out/lora}
renders:
  specs_csv: specs.csv
  candidates_per_image: 1
  num_inference_steps: 2
  sampler: euler
  require_qa_pass: false   # the random tiny model never passes product QA
device: cpu
"""
    (tmp_path / "renders.yaml").write_text(config)
    resources: dict[str, Any] = {
        "pipeline_config": PipelineConfigResource(config_path=str(tmp_path / "renders.yaml")),
        "device": DeviceResource(device="cpu"),
        "base_model": BaseModelResource(cache_dir=str(tiny_sdxl_cache)),
    }
    with one_torch_thread():
        result = dg.materialize(render_assets("casual_shoes"), resources=resources)
    assert result.success
    meta = {
        m.asset_key.path[-1]: m.materialization.metadata for m in result.get_asset_materialization_events()
    }
    assert meta["product_renders"]["pipeline"].value == "final_pipeline"
    renders = tmp_path / "out" / "lora" / "renders"
    manifest = list(csv.DictReader((renders / "published" / "manifest.csv").open(encoding="utf-8")))
    assert [r["sku"] for r in manifest] == ["XL-1", "XL-2"] and all(r["hires"] == "128x128" for r in manifest)

    # Candidates that are product photos publish (hires off, as in the SD1.5 test): the same finishing
    # and marking, and the parameters name the SDXL base model and its hash.
    for png in (renders / "candidates").rglob("*.png"):
        white_sneaker(1024, (250, 450, 800, 700)).save(png)
    no_hires = tmp_path / "no_hires.yaml"
    no_hires.write_text(config.replace("renders:\n", "renders:\n  hires: {enabled: false}\n"))
    publish_only = {**resources, "pipeline_config": PipelineConfigResource(config_path=str(no_hires))}
    result = dg.materialize(render_assets("casual_shoes")[1:], resources=publish_only)
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata["failing"].value
    jpgs = sorted((renders / "published" / "amazon_main").rglob("*.jpg"))
    assert [p.parent.name for p in jpgs] == ["XL-1", "XL-2"]
    fingerprint = base_model_identity("tiny-sdxl", tiny_sdxl_path(tiny_sdxl_cache))["fingerprint"]
    for jpg in jpgs:
        found = read_marking(jpg)
        assert found["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
        params = parse_a1111_parameters(found["parameters"])
        assert params["Model hash"] == fingerprint[:10] and params["Model"] == "tiny-sdxl"
        assert params["Sampler"] == "Euler" and params["Lora hashes"].startswith("casual_shoes_lora: ")
        assert found["render"]["lora_provenance"]["base_model_family"] == "sdxl"
