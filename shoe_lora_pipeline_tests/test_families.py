"""The family of a base model is read from its config; insisting on the other one is a clear error."""

import json
from pathlib import Path

import pytest
import torch

from shoe_lora_pipeline.core import models
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.families import (
    SD15,
    SDXL,
    ModelFamilyError,
    family_named,
    family_of_folder,
    family_of_unet_config,
    resolve_family,
)


def test_family_of_the_published_configs_built_on_meta() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**models.SDXL_UNET_CONFIG)
        sd15 = UNet2DConditionModel(**models.SD15_UNET_CONFIG)
    assert family_of_unet_config(sdxl.config) is SDXL
    assert family_of_unet_config(sd15.config) is SD15


def test_family_facts() -> None:
    assert SD15.default_resolution == 512 and SDXL.default_resolution == 1024
    assert SDXL.text_encoder_subfolders == ("text_encoder", "text_encoder_2")
    assert (
        SDXL.kohya_base_model_version == "sdxl_base_v1-0" and SDXL.vae_needs_fp32 and not SD15.vae_needs_fp32
    )
    assert SDXL.text2img_pipeline_class().__name__ == "StableDiffusionXLPipeline"
    assert SD15.img2img_pipeline_class().__name__ == "StableDiffusionImg2ImgPipeline"
    assert SDXL.text_encoder_class(1).__name__ == "CLIPTextModelWithProjection"
    with pytest.raises(ModelFamilyError, match="training.model_family = 'sd3'"):
        family_named("sd3")


def _folder(tmp_path: Path, unet_config: dict, second_encoder: bool) -> Path:
    (tmp_path / "unet").mkdir(parents=True)
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet_config))
    if second_encoder:
        (tmp_path / "text_encoder_2").mkdir()
    return tmp_path


def test_family_of_folder_and_half_sdxl_folders(tmp_path: Path) -> None:
    assert family_of_folder(_folder(tmp_path / "a", models.SDXL_UNET_CONFIG, True)) is SDXL
    assert family_of_folder(_folder(tmp_path / "b", models.SD15_UNET_CONFIG, False)) is SD15
    with pytest.raises(ModelFamilyError, match="text_time.*has no text_encoder_2"):
        family_of_folder(_folder(tmp_path / "c", models.SDXL_UNET_CONFIG, False))
    with pytest.raises(ModelFamilyError, match="has text_encoder_2"):
        family_of_folder(_folder(tmp_path / "d", models.SD15_UNET_CONFIG, True))
    with pytest.raises(ModelFamilyError, match="cannot read the base model's UNet config"):
        family_of_folder(tmp_path / "missing")


def test_insisting_on_a_family() -> None:
    assert resolve_family(SDXL, "auto") is SDXL and resolve_family(SD15, "sd15") is SD15
    with pytest.raises(ModelFamilyError, match="training.model_family = 'sdxl' but the base model is sd15"):
        resolve_family(SD15, "sdxl")


def _cfg(tmp_path: Path, **training: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "dataset": {"raw_dir": str(tmp_path), "output_dir": str(tmp_path / "out"), "resolution": 512},
            "training": {"output_dir": str(tmp_path / "lora"), **training},
        }
    )


def test_training_hash_includes_the_family_but_not_for_sd15(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    # SD1.5 hashes are those recorded before families existed: neither the resolved family nor the
    # insisted one changes them.
    assert (
        cfg.training_hash("sd15")
        == cfg.training_hash()
        == _cfg(tmp_path, model_family="sd15").training_hash()
    )
    assert cfg.training_hash("sdxl") != cfg.training_hash()
    assert _cfg(tmp_path, model_family="sdxl").training_hash() == cfg.training_hash("sdxl")
