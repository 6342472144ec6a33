"""SDXL through the same training stage: the cache holds both encoders' hidden states and the pooled
embedding, the size conditioning comes from captions.json, and the loop keeps its promises (cached =
uncached, micro-batch invariance, bit-identical resume, validation loss, caption dropout of all three
embeddings); a checkpoint of one family never resumes on the other."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from shoe_lora_pipeline.core.latents import cache_latents, load_latent_dataset, size_time_ids
from shoe_lora_pipeline.core.models import TINY_SDXL, SDComponents, load_base_model
from shoe_lora_pipeline.core.normalise import crop_offset, fit_square
from shoe_lora_pipeline.core.train_data import CachedSource, MicroBatch, SourceBatch, dataset_fingerprint
from shoe_lora_pipeline.core.training import TrainingError, diffusion_loss
from shoe_lora_pipeline_tests.support.training import (
    NUM_IMAGES,
    assert_same_lora,
    cpu,
    keep_last,
    lora_tensors,
    make_cfg,
    make_train_set,
    one_torch_thread,
    relative_difference,
    run_training,
)

SDXL_RESOLUTION = 64  # 8×8 latents: a tiny-sdxl step takes a fraction of a second


class _HardStop(Exception):
    pass


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_cache: Path) -> dict[str, Any]:
    """A 6-image train set and a 2-image val set with their tiny-sdxl latent caches."""
    root = tmp_path_factory.mktemp("sdxl-dataset")
    train = make_train_set(root, resolution=SDXL_RESOLUTION)
    val = keep_last(make_train_set(root / "held_out", n=NUM_IMAGES + 2, resolution=SDXL_RESOLUTION), 2)
    with one_torch_thread():
        components = load_base_model(TINY_SDXL, cache_dir=tiny_sdxl_cache)
        report = cache_latents(components, train, root / "latents", SDXL_RESOLUTION, 4, "cpu")
        cache_latents(components, val, root / "val_latents", SDXL_RESOLUTION, 4, "cpu")
    return {
        "root": root,
        "train": train,
        "latents": root / "latents",
        "fingerprint": dataset_fingerprint(train),
        "val": val,
        "val_latents": root / "val_latents",
        "report": report,
        "load": lambda: load_base_model(TINY_SDXL, cache_dir=tiny_sdxl_cache),
    }


def sdxl_cfg(root: Path, **training: Any):
    cfg = make_cfg(root, base_model=TINY_SDXL, **training)
    cfg.dataset.resolution = SDXL_RESOLUTION
    return cfg


def test_cache_holds_both_encoders_and_the_pooled_embedding(sdxl: dict[str, Any]) -> None:
    components: SDComponents = sdxl["load"]()
    ds = load_latent_dataset(sdxl["latents"], sdxl["train"])
    width = components.text_encoder.config.hidden_size + components.text_encoder_2.config.hidden_size
    assert ds.text_embeddings.shape == (NUM_IMAGES, 77, width)
    assert ds.pooled_embeddings.shape == (NUM_IMAGES, components.text_encoder_2.config.projection_dim)
    index = json.loads((sdxl["latents"] / "index.json").read_text())
    assert index["pooled_shape"] == [components.text_encoder_2.config.projection_dim]
    assert index["base_model"]["family"] == "sdxl" and index["scaling_factor"] == 0.13025
    # What StableDiffusionXLPipeline.encode_prompt gives for the same caption (penultimate hidden states
    # of both encoders side by side; the second encoder's pooled, projected embedding).
    with torch.no_grad():
        embeds, _, pooled, _ = components.pipeline().encode_prompt(
            ds.captions[0], device=torch.device("cpu"), do_classifier_free_guidance=False
        )
    torch.testing.assert_close(ds.text_embeddings[0], embeds[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds.pooled_embeddings[0], pooled[0], rtol=1e-5, atol=1e-6)
    # The SDXL VAE overflows in fp16: the cache says it encoded in fp32.
    assert any("VAE encodes in fp32" in note for note in sdxl["report"].notes)


def test_size_conditioning_from_captions_metadata() -> None:
    # time_ids = original (h, w) + crop top-left (top, left) + target (h, w), as diffusers' compute_time_ids.
    assert size_time_ids({"original_size": [1200, 800]}, 1024, "pad") == [800, 1200, 0, 0, 1024, 1024]
    # crop: shorter side to 1024 → 1536 × 1024, centre crop from x = 256
    assert size_time_ids({"original_size": [1200, 800]}, 1024, "crop") == [800, 1200, 0, 256, 1024, 1024]
    assert size_time_ids({"original_size": [600, 900]}, 512, "crop") == [900, 600, 128, 0, 512, 512]
    # an entry that states its crop keeps it
    stated = {"original_size": [1200, 800], "crop_top_left": [3, 7]}
    assert size_time_ids(stated, 1024, "crop") == [800, 1200, 3, 7, 1024, 1024]


def test_crop_offset_is_where_the_cleaning_stage_cut() -> None:
    from PIL import Image

    # A photo with one red column at x = 400 (of 1200): after the crop to 512 it must sit at
    # 400 × scale − left.
    photo = Image.new("RGB", (1200, 800), "white")
    for y in range(800):
        photo.putpixel((400, y), (255, 0, 0))
        photo.putpixel((401, y), (255, 0, 0))
    top, left = crop_offset((1200, 800), 512, "crop")
    assert (top, left) == (0, 128)  # 768 × 512 after the resize
    out = fit_square(photo, 512, "crop")
    reds = [x for x in range(512) if out.getpixel((x, 256))[1] < 128]
    assert reds and abs(sum(reds) / len(reds) - (400.5 * 512 / 800 - left)) < 1.5


def test_cached_source_gives_pooled_and_time_ids(sdxl: dict[str, Any]) -> None:
    source = CachedSource(
        sdxl["latents"],
        sdxl["train"],
        sdxl["load"]().identity["fingerprint"],
        SDXL_RESOLUTION,
        torch.device("cpu"),
    )
    got = source.get([0, 1])
    assert got.pooled.shape == (2, 32)
    r = SDXL_RESOLUTION
    assert got.time_ids.tolist() == [[r, r, 0, 0, r, r]] * 2  # original size = r (make_train_set), pad


def test_caption_dropout_drops_both_encoders_and_the_pooled_embedding(load_components) -> None:
    seen: dict[str, Any] = {}

    class Recorder(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states, return_dict=False, added_cond_kwargs=None):
            seen["text"], seen["added"] = encoder_hidden_states, added_cond_kwargs
            return (torch.zeros_like(sample),)

    class Source:
        def get(self, items):
            zeros = torch.zeros(2, 4, 2, 2)
            return SourceBatch(zeros, zeros, torch.ones(2, 3, 5), torch.ones(2, 4), torch.full((2, 6), 7.0))

    drop = torch.tensor([True, False])
    batch = MicroBatch(
        0, [0, 1], [0, 1], 0, *(torch.zeros(2, 4, 2, 2) for _ in range(3)), torch.tensor([5, 5]), drop
    )
    empty_text, empty_pooled = torch.full((3, 5), -1.0), torch.full((4,), -2.0)
    scheduler = load_components().noise_scheduler
    diffusion_loss(
        Recorder(), scheduler, batch, Source(), empty_text, 1.0, torch.float32, empty_pooled=empty_pooled
    )
    assert torch.equal(seen["text"][0], empty_text) and torch.equal(seen["text"][1], torch.ones(3, 5))
    pooled = seen["added"]["text_embeds"]
    assert torch.equal(pooled[0], empty_pooled) and torch.equal(pooled[1], torch.ones(4))
    assert torch.equal(seen["added"]["time_ids"], torch.full((2, 6), 7.0))  # the size conditioning stays
    with pytest.raises(ValueError, match="pooled embedding"):
        diffusion_loss(Recorder(), scheduler, batch, Source(), empty_text, 1.0, torch.float32)


def test_sdxl_training_cached_uncached_micro_batch_and_validation(
    tmp_path: Path, sdxl: dict[str, Any]
) -> None:
    settings = {"max_train_steps": 3, "validation_steps": 3, "caption_dropout": 0.3, "snr_gamma": 5.0}
    with one_torch_thread():
        cached = run_training(sdxl_cfg(tmp_path / "cached", **settings), sdxl["load"](), sdxl, with_val=True)
        uncached = run_training(
            sdxl_cfg(tmp_path / "uncached", cache_latents=False, **settings),
            sdxl["load"](),
            sdxl,
            with_val=True,
        )
        micro1 = run_training(
            sdxl_cfg(tmp_path / "micro1", micro_batch_size=1, **settings), sdxl["load"](), sdxl
        )
    a, b = [r["loss"] for r in cached.losses], [r["loss"] for r in uncached.losses]
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-5, abs=1e-7)
    assert [r["loss"] for r in micro1.losses] == pytest.approx(a, rel=1e-5)
    reference = lora_tensors(cached.checkpoint_dir)
    for other in (uncached, micro1):  # the same samples; only the float summation order differs
        assert relative_difference(lora_tensors(other.checkpoint_dir), reference) <= 1e-4
    assert cached.val_loss is not None and cached.val_loss == pytest.approx(uncached.val_loss, rel=1e-5)
    assert cached.latest_grid is not None and cached.latest_grid.is_file()
    log = cached.log_path.read_text()
    assert "Base model family = sdxl" in log and "time_ids" in log
    assert "VAE encodes in fp32" in uncached.log_path.read_text()  # the uncached run encodes: it says so
    assert cached.flops_per_image and cached.flops_per_image > 0  # counted with the added conditions
    state = json.loads((cached.checkpoint_dir / "training_state.json").read_text())
    assert state["training_config"]["model_family"] == "sdxl" and state["base_model"]["family"] == "sdxl"


def test_sdxl_resume_is_bit_identical(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    settings = {"max_train_steps": 4, "checkpointing_steps": 2, "caption_dropout": 0.3}
    with one_torch_thread():
        whole = run_training(sdxl_cfg(tmp_path / "whole", **settings), sdxl["load"](), sdxl)

        def stop_at_3(progress: dict[str, Any]) -> None:
            if progress["step"] == 3:
                raise _HardStop

        cfg = sdxl_cfg(tmp_path / "resumed", **settings)
        with pytest.raises(_HardStop):
            run_training(cfg, sdxl["load"](), sdxl, on_progress=stop_at_3)
        resumed = run_training(cfg, sdxl["load"](), sdxl)
    assert resumed.resumed_from == 2 and resumed.global_step == 4
    assert_same_lora(lora_tensors(resumed.checkpoint_dir), lora_tensors(whole.checkpoint_dir))


def test_a_checkpoint_of_one_family_never_resumes_on_the_other(
    tmp_path: Path, sdxl: dict[str, Any], load_components, dataset
) -> None:
    cfg = sdxl_cfg(tmp_path, max_train_steps=1, cache_latents=False)
    with one_torch_thread():
        run_training(cfg, sdxl["load"](), sdxl)
        # The same config, output folder and dataset fingerprint, the SD1.5 model: a fresh start that names
        # the family as the setting at fault.
        same_data = {**dataset, "fingerprint": sdxl["fingerprint"]}
        result = run_training(cfg, load_components(), same_data, max_steps_this_run=0)
    assert result.resumed_from is None
    assert "training_hash differs" in result.resume_note
    assert "training.model_family: 'sdxl' -> 'sd15'" in result.resume_note
    assert "dataset_fingerprint" not in result.resume_note


def test_resolution_not_divisible_by_the_vae_factor_is_named(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    cfg = sdxl_cfg(tmp_path, max_train_steps=1, cache_latents=False)
    cfg.dataset.resolution = 100
    with pytest.raises(
        TrainingError, match=r"dataset.resolution = 100 is not divisible by 8.*Stable Diffusion XL"
    ):
        run_training(cfg, sdxl["load"](), sdxl)
    with pytest.raises(ValueError, match=r"dataset.resolution = 68 is not divisible by 8.*use 64 or 72"):
        cache_latents(sdxl["load"](), sdxl["train"], tmp_path / "latents", 68, 4, "cpu")


def test_sdxl_under_bf16_keeps_the_vae_in_fp32(tmp_path: Path, sdxl: dict[str, Any]) -> None:
    # accelerate's (effective) bf16 on the CPU: frozen UNet and text encoders in bf16, the VAE in fp32 for
    # the on-the-fly encoding and the validation decode (the SDXL VAE overflows in half precision).
    bf16 = dataclasses.replace(cpu(), mixed_precision="bf16", dtype_policy="test: bf16 on cpu")
    components = sdxl["load"]()
    cfg = sdxl_cfg(tmp_path, max_train_steps=2, cache_latents=False, validation_steps=2)
    with one_torch_thread():
        result = run_training(cfg, components, sdxl, device_info=bf16)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    assert next(components.vae.parameters()).dtype == torch.float32
    assert next(components.text_encoder_2.parameters()).dtype == torch.bfloat16
    assert result.latest_grid is not None and result.latest_grid.is_file()
    assert "VAE encodes in fp32" in result.log_path.read_text()
