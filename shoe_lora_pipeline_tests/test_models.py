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


def test_sdxl_unet_with_reference_lora_has_exact_parameter_counts() -> None:
    # The published SDXL base 1.0 UNet config, built on the meta device.
    trainable, total, layers = models.sdxl_unet_lora_parameter_counts(
        8, 16, ("to_k", "to_q", "to_v", "to_out.0")
    )
    assert total - trainable == 2_567_463_684
    assert trainable == 11_612_160
    assert layers == 140


def test_tiny_sdxl_is_sdxl_shaped(tiny_sdxl_cache: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from open_clip.tokenizer import SimpleTokenizer

    from shoe_lora_pipeline.core.families import SDXL, family_of_folder

    folder = models.tiny_sdxl_path(tiny_sdxl_cache)
    assert family_of_folder(folder) is SDXL
    c = models.load_base_model(models.TINY_SDXL, cache_dir=tiny_sdxl_cache)
    assert c.family is SDXL and c.identity["family"] == "sdxl"
    assert c.identity["revision"] == f"tiny-sdxl-v{models.TINY_SDXL_VERSION}"
    assert type(c.text_encoder).__name__ == "CLIPTextModel"
    assert type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert c.unet.config.addition_embed_type == "text_time"
    # The UNet cross-attends to both encoders' hidden states side by side; the added embedding takes 6
    # time_ids and the pooled (projected) embedding of the second encoder.
    width = c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    assert c.unet.config.cross_attention_dim == width
    assert c.unet.config.projection_class_embeddings_input_dim == (
        6 * c.unet.config.addition_time_embed_dim + c.text_encoder_2.config.projection_dim
    )
    assert c.vae_scale_factor == 8 and c.vae.config.scaling_factor == 0.13025
    text = "A professional product photo of brown leather casual shoes on white background"
    for tok in c.tokenizers:
        assert len(tok) == 49408 and tok(text).input_ids[1:-1] == SimpleTokenizer().encode(text)
    assert c.tokenizer.pad_token == "<|endoftext|>" and c.tokenizer_2.pad_token == "!"
    assert type(c.pipeline()).__name__ == "StableDiffusionXLPipeline"
    # diffusers' own loader reads the folder (the path a user's script takes).
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    image = c.pipeline()(
        "black casual shoes",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_tiny_sdxl_build_is_deterministic(tmp_path: Path, tiny_sdxl_cache: Path) -> None:
    from safetensors.torch import load_file

    again = models.build_tiny_sdxl(tmp_path / "again")
    first = models.tiny_sdxl_path(tiny_sdxl_cache)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a = load_file(next((first / sub).glob("*.safetensors")))
        b = load_file(next((again / sub).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        models.base_model_identity("tiny-sdxl", first)["fingerprint"]
        == models.base_model_identity("tiny-sdxl", again)["fingerprint"]
    )


def test_sd15_components_keep_their_pipeline_and_identity(
    load_components: Callable[[], models.SDComponents],
) -> None:
    from shoe_lora_pipeline.core.families import SD15

    c = load_components()
    assert c.family is SD15 and c.text_encoder_2 is None and c.tokenizer_2 is None
    assert "family" not in c.identity  # SD1.5 identities are recorded as before families existed
    assert len(c.text_encoders) == 1 and len(c.tokenizers) == 1
    assert type(c.pipeline()).__name__ == "StableDiffusionPipeline"


def test_model_family_insisted_on_the_other_family_is_named(
    tiny_sd_cache: Path, tiny_sdxl_cache: Path
) -> None:
    from shoe_lora_pipeline.core.families import ModelFamilyError

    with pytest.raises(ModelFamilyError, match=r"training.model_family = 'sd15'.*is sdxl.*text_time"):
        models.load_base_model(models.TINY_SDXL, cache_dir=tiny_sdxl_cache, model_family="sd15")
    with pytest.raises(ModelFamilyError, match=r"training.model_family = 'sdxl'.*is sd15"):
        models.load_base_model(models.TINY_SD, cache_dir=tiny_sd_cache, model_family="sdxl")
