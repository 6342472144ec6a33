import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shoe_lora_pipeline.core import models


def test_sd15_unet_with_reference_lora_has_exact_parameter_counts() -> None:
    # Built on the meta device: architecture only, no memory, no download.
    trainable, total = models.sd15_unet_lora_parameter_counts(8, 16, ("to_k", "to_q", "to_v", "to_out.0"))
    assert trainable == 1_594_368
    assert total == 861_115_332


def test_tiny_sd_is_sd_shaped(load_components: Callable[[], models.SDComponents]) -> None:
    c = load_components()
    assert type(c.unet).__name__ == "UNet2DConditionModel"
    assert type(c.vae).__name__ == "AutoencoderKL"
    assert type(c.text_encoder).__name__ == "CLIPTextModel"
    assert len(c.vae.config.block_out_channels) == 4 and c.vae_scale_factor == 8
    assert c.text_encoder.config.vocab_size == 49408 and len(c.tokenizer) == 49408
    assert any("CrossAttn" in b for b in c.unet.config.down_block_types)
    assert c.noise_scheduler.config.prediction_type == "epsilon"
    assert c.noise_scheduler.config.num_train_timesteps == 1000
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        lat = c.vae.encode(x).latent_dist.mean
    assert lat.shape == (1, 4, 8, 8)
    assert not any(p.requires_grad for p in c.unet.parameters())


def test_tokenizer_is_the_real_clip_bpe(load_components: Callable[[], models.SDComponents]) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    text = "A professional product photo of brown leather casual shoes on white background"
    ids = load_components().tokenizer(text).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:-1] == SimpleTokenizer().encode(text)


def test_tiny_sd_build_is_deterministic(tmp_path: Path, tiny_sd_cache: Path) -> None:
    from safetensors.torch import load_file

    again = models.build_tiny_sd(tmp_path / "again")
    first = models.tiny_sd_path(tiny_sd_cache)
    for sub in ("unet", "vae", "text_encoder"):
        a = load_file(next((first / sub).glob("*.safetensors")))
        b = load_file(next((again / sub).glob("*.safetensors")))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    ident_a = models.base_model_identity("tiny-sd", first)
    ident_b = models.base_model_identity("tiny-sd", again)
    assert ident_a["fingerprint"] == ident_b["fingerprint"]
    assert ident_a["revision"] == f"tiny-sd-v{models.TINY_SD_VERSION}"


def test_local_folder_loads_with_safetensors(tiny_sd_cache: Path) -> None:
    folder = models.tiny_sd_path(tiny_sd_cache)
    assert list((folder / "unet").glob("*.safetensors")) and not list(folder.rglob("*.bin"))
    comps = models.load_base_model(str(folder))
    assert comps.identity["base_model"] == str(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_offline_hub_id_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(models.BaseModelError) as err:
        models.resolve_base_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    msg = str(err.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
    assert "download it first" in msg and "local diffusers folder" in msg


def test_missing_or_wrong_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(models.BaseModelError, match="does not exist"):
        models.resolve_base_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.BaseModelError, match="not a diffusers model"):
        models.resolve_base_model(str(tmp_path / "empty"))
