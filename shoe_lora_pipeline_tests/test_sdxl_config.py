"""The SDXL configs ship the recipe's choices at 1024 px; the SD1.5 demo and recipe are unchanged by the
second family; the resolution defaults to the family's native size."""

from pathlib import Path

import pytest

from shoe_lora_pipeline.core.config import PipelineConfig, load_config
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT

# training_hash() of the shipped SD1.5 configs computed by the code before the SDXL family existed (commit
# 2b66ba9): a resumed SD1.5 run keeps its checkpoints.
SD15_RECIPE_TRAINING_HASH = "56fca3fab6665638b07b205e8026f3dc0f978b98d08d0f346a731f39eb9468fa"


def test_sd15_recipe_and_demo_are_unchanged() -> None:
    recipe = load_config(REPO_ROOT / "configs" / "casual_shoes_sd15.yaml", check_paths=False)
    assert recipe.training_hash() == SD15_RECIPE_TRAINING_HASH
    assert recipe.training_hash("sd15") == SD15_RECIPE_TRAINING_HASH  # the resolved family adds nothing
    assert recipe.dataset.resolution == 512 and recipe.training.model_family == "auto"
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml", check_paths=False)
    assert demo.training.base_model == "tiny-shoes" and demo.dataset.resolution == 128
    assert demo.training_hash("sd15") == demo.training_hash()
    assert demo.training.model_family == "auto" and demo.training.vae is None


def test_sdxl_recipe_carries_the_recipe_choices_at_1024() -> None:
    sdxl = load_config(REPO_ROOT / "configs" / "casual_shoes_sdxl.yaml", check_paths=False)
    sd15 = load_config(REPO_ROOT / "configs" / "casual_shoes_sd15.yaml", check_paths=False)
    t = sdxl.training
    assert t.base_model == "stabilityai/stable-diffusion-xl-base-1.0" and t.model_family == "sdxl"
    assert sdxl.dataset.resolution == 1024
    # Everything else as the SD1.5 recipe: r 8, alpha 16, the same targets, cosine, batch, steps, prompts.
    recipe = sd15.training.model_dump(exclude={"output_dir"})
    differing = {k for k, v in t.model_dump(exclude={"output_dir"}).items() if v != recipe[k]}
    assert differing == {"base_model", "model_family"}
    assert (t.lora_rank, t.lora_alpha, t.lr_scheduler) == (8, 16, "cosine")
    assert t.lora_target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    assert sdxl.training_hash() != sd15.training_hash()


def test_sdxl_demo_config() -> None:
    demo = load_config(REPO_ROOT / "configs" / "demo_sdxl.yaml", check_paths=False)
    sd15_demo = load_config(REPO_ROOT / "configs" / "demo.yaml", check_paths=False)
    assert demo.training.base_model == "tiny-sdxl" and demo.training.model_family == "sdxl"
    assert demo.dataset.resolution == 128 and demo.dataset.resolution % 8 == 0
    assert demo.dataset.output_dir != sd15_demo.dataset.output_dir  # the two demos never share outputs
    assert demo.training.output_dir != sd15_demo.training.output_dir


def _cfg(tmp_path: Path, dataset: dict | None = None, **training: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "dataset": {"raw_dir": str(tmp_path), "output_dir": str(tmp_path / "out"), **(dataset or {})},
            "training": {"output_dir": str(tmp_path / "lora"), **training},
        }
    )


def test_resolution_defaults_to_the_family(tmp_path: Path, tiny_sdxl_cache: Path) -> None:
    from shoe_lora_pipeline.core.models import tiny_sdxl_path

    assert _cfg(tmp_path).dataset.resolution == 512  # tiny-sd
    assert _cfg(tmp_path, base_model="tiny-sdxl").dataset.resolution == 1024
    assert _cfg(tmp_path, base_model="stabilityai/stable-diffusion-xl-base-1.0").dataset.resolution == 1024
    assert _cfg(tmp_path, base_model=str(tiny_sdxl_path(tiny_sdxl_cache))).dataset.resolution == 1024
    assert _cfg(tmp_path, base_model="some/unknown-model", model_family="sdxl").dataset.resolution == 1024
    # a configured resolution is kept
    assert _cfg(tmp_path, {"resolution": 256}, base_model="tiny-sdxl").dataset.resolution == 256


def test_an_unknown_family_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_family"):
        _cfg(tmp_path, model_family="sd3")


def test_a_configured_vae_is_part_of_the_hash_and_the_identity(tmp_path: Path, tiny_sdxl_cache: Path) -> None:
    import shutil

    import torch

    from shoe_lora_pipeline.core.latents import vae_encoding_dtype
    from shoe_lora_pipeline.core.models import BaseModelError, load_base_model, tiny_sdxl_path

    vae_dir = tmp_path / "fixed-vae"
    shutil.copytree(tiny_sdxl_path(tiny_sdxl_cache) / "vae", vae_dir)
    assert _cfg(tmp_path, vae=str(vae_dir)).training_hash() != _cfg(tmp_path).training_hash()
    plain = load_base_model("tiny-sdxl", cache_dir=tiny_sdxl_cache)
    fixed = load_base_model("tiny-sdxl", cache_dir=tiny_sdxl_cache, vae=str(vae_dir))
    assert fixed.identity["vae"]["vae"] == str(vae_dir)
    assert fixed.identity["fingerprint"] != plain.identity["fingerprint"]  # latent caches keyed apart
    assert vae_encoding_dtype(plain, torch.float16)[0] == torch.float32  # the SDXL VAE overflows in fp16
    assert vae_encoding_dtype(fixed, torch.float16) == (torch.float16, None)
    with pytest.raises(BaseModelError, match="training.vae"):
        load_base_model("tiny-sdxl", cache_dir=tiny_sdxl_cache, vae=str(tmp_path / "missing"))
