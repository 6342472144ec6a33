"""An SDXL LoRA exported on tiny-sdxl gives the trained model's output through every loader a user would use.

As test_lora_equivalence.py for SD1.5: the UNet output of the in-memory adapted model (the one the trainer
saved) against the LoRA loaded through
  (a) PeftModel.from_pretrained(fresh_unet, lora_weights_dir)                          -- PEFT files
  (b) StableDiffusionXLPipeline.load_lora_weights(lora_weights_dir)                    -- diffusers file
  (c) StableDiffusionXLPipeline.load_lora_weights(dir, weight_name="<name>_lora.safetensors") -- kohya file
      (SDXL's LDM block names, read by diffusers' kohya converter)
  (d) StableDiffusionXLPipeline.from_pretrained(final_pipeline).unet                   -- fused weights
and whole images: the same seed gives the same image through (b), (c) and (d). A LoRA of one family
loaded onto the other is refused, naming the keys and the family found.
Tolerance (fp32, CPU): atol 1e-5, rtol 1e-4 on the UNet output; 2/255 on images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.families import SD15, SDXL
from shoe_lora_pipeline.core.models import tiny_sd_path, tiny_sdxl_path
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint

ATOL, RTOL = 1e-5, 1e-4
DATASET = "casual_shoes"
KOHYA = f"{DATASET}_lora.safetensors"
PROMPT = "A professional product photo of black casual shoes on white background"


@dataclass
class Case:
    base_dir: Path
    lora_dir: Path
    fused_dir: Path
    inputs: dict[str, torch.Tensor]
    reference: torch.Tensor  # in-memory adapted UNet
    base_output: torch.Tensor  # UNet without LoRA


def unet_out(unet: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(
            inputs["latents"],
            inputs["t"],
            encoder_hidden_states=inputs["text"],
            added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]},
        ).sample


def sdxl_pipe(path: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe: Any) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_cache: Path) -> Case:
    base_dir = tiny_sdxl_path(tiny_sdxl_cache)
    root = tmp_path_factory.mktemp("train-sdxl")
    ckpt, unet = make_training_checkpoint(
        root, base_dir, rank=8, alpha=16, seed=3, base_model="tiny-sdxl", resolution=1024
    )
    lora_dir = root / "lora_weights"
    lora_io.export_lora(ckpt, lora_dir, dataset_name=DATASET, provenance={"dagster_run_id": "r"})
    fused_dir = lora_io.fuse_lora_pipeline(base_dir, lora_dir, root / "final_pipeline")
    gen = torch.Generator().manual_seed(123)
    cfg = unet.config
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    inputs = {
        "latents": torch.randn(1, 4, 16, 16, generator=gen),
        "t": torch.tensor([500]),
        "text": torch.randn(1, 77, cfg.cross_attention_dim, generator=gen),
        "pooled": torch.randn(1, pooled_dim, generator=gen),
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]),
    }
    reference = unet_out(unet, inputs)
    unet.disable_adapters()
    base_output = unet_out(unet, inputs)
    return Case(base_dir, lora_dir, fused_dir, inputs, reference, base_output)


def assert_matches(case: Case, output: torch.Tensor) -> None:
    torch.testing.assert_close(output, case.reference, atol=ATOL, rtol=RTOL)


def test_lora_changes_the_output(case: Case) -> None:
    assert (case.reference - case.base_output).abs().max() > 1e-2


def test_kohya_file_has_sdxl_names_and_metadata(case: Case) -> None:
    from safetensors.torch import load_file

    sd = load_file(case.lora_dir / KOHYA)
    modules = {k.split(".")[0] for k in sd}
    assert modules and all(
        m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"))
        for m in modules
    )
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k" in modules  # tiny-sdxl: 1 layer/block
    header = lora_io.weights_header(case.lora_dir / KOHYA)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["ss_sd_model_name"] == "tiny-sdxl"
    assert header["ss_resolution"] == "(1024, 1024)"
    assert header["ss_network_alpha"] == "16.0" and header["ss_network_dim"] == "8"
    assert lora_io.read_provenance(case.lora_dir)["provenance"]["base_model_family"] == "sdxl"
    card = (case.lora_dir / lora_io.MODEL_CARD_NAME).read_text()
    assert "StableDiffusionXLPipeline.from_pretrained(" in card and "Stable Diffusion XL checkpoint" in card


def test_peft_from_pretrained_matches(case: Case) -> None:
    from peft import PeftModel

    model = PeftModel.from_pretrained(sdxl_unet(case), str(case.lora_dir))
    assert_matches(case, unet_out(model.eval(), case.inputs))


def test_diffusers_load_lora_weights_matches(case: Case) -> None:
    pipe = sdxl_pipe(case.base_dir)
    pipe.load_lora_weights(str(case.lora_dir))
    assert_matches(case, unet_out(pipe.unet, case.inputs))


def test_kohya_file_through_diffusers_kohya_loader_matches(case: Case) -> None:
    pipe = sdxl_pipe(case.base_dir)
    pipe.load_lora_weights(str(case.lora_dir), weight_name=KOHYA)
    assert_matches(case, unet_out(pipe.unet, case.inputs))


def test_fused_pipeline_is_an_sdxl_folder_and_matches(case: Case) -> None:
    import json

    index = json.loads((case.fused_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    pipe = sdxl_pipe(case.fused_dir)
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    assert_matches(case, unet_out(pipe.unet, case.inputs))
    assert lora_io.read_provenance(case.fused_dir)["format"] == "fused_pipeline"


def test_same_seed_same_image_through_every_loader(case: Case) -> None:
    base = sdxl_pipe(case.base_dir)
    base_image = image(base)
    base.load_lora_weights(str(case.lora_dir))
    diffusers_image = image(base)
    kohya = sdxl_pipe(case.base_dir)
    kohya.load_lora_weights(str(case.lora_dir), weight_name=KOHYA)
    fused = sdxl_pipe(case.fused_dir)
    for other in (image(kohya), image(fused)):
        assert np.abs(other - diffusers_image).max() <= 2 / 255
    assert np.abs(diffusers_image - base_image).max() > 4 / 255  # the LoRA changes the image


def sdxl_unet(case: Case) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(case.base_dir, subfolder="unet", use_safetensors=True)


def test_sdxl_lora_onto_sd15_model_is_refused(case: Case, tiny_sd_cache: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    sd15_unet = UNet2DConditionModel.from_pretrained(
        tiny_sd_path(tiny_sd_cache), subfolder="unet", use_safetensors=True
    )
    for path in (case.lora_dir / KOHYA, case.lora_dir, case.lora_dir / lora_io.PEFT_WEIGHTS_NAME):
        with pytest.raises(lora_io.LoraMismatchError) as err:
            lora_io.check_lora_fits(path, sd15_unet, SD15)
        message = str(err.value)
        assert "sd15 (Stable Diffusion 1.5)" in message and "Family found in the file: sdxl" in message
        assert re.search(
            r"(lora_unet_|unet\.|base_model\.model\.)\S+_to_k\S*\.weight|to_k\.\S+weight", message
        )
    with pytest.raises(lora_io.LoraMismatchError, match="ss_base_model_version = 'sdxl_base_v1-0'"):
        lora_io.check_lora_fits(case.lora_dir / KOHYA, sd15_unet, SD15)
    # A file that says nothing of its family is judged by its layers: tiny-sdxl's second transformer
    # block at the deepest level has no counterpart in tiny-sd.
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(case.lora_dir / lora_io.DIFFUSERS_WEIGHTS_NAME), bare)
    with pytest.raises(lora_io.LoraMismatchError, match=r"transformer_blocks\.1\.\S+ \(no such layer") as err:
        lora_io.check_lora_fits(bare, sd15_unet, SD15)
    assert "Family found in the file: not recorded in the file" in str(err.value)
    lora_io.check_lora_fits(bare, sdxl_unet(case), SDXL)  # and it does fit its own model


def test_sd15_lora_onto_sdxl_model_is_refused(case: Case, tiny_sd_cache: Path, tmp_path: Path) -> None:
    sd15_base = tiny_sd_path(tiny_sd_cache)
    ckpt, _ = make_training_checkpoint(tmp_path / "sd15", sd15_base)
    sd15_lora = tmp_path / "sd15" / "lora_weights"
    lora_io.export_lora(ckpt, sd15_lora, dataset_name=DATASET, provenance={})
    with pytest.raises(lora_io.LoraMismatchError) as err:
        lora_io.fuse_lora_pipeline(case.base_dir, sd15_lora, tmp_path / "fused")
    message = str(err.value)
    assert "sdxl (Stable Diffusion XL)" in message and "Family found in the file: sd15" in message
    assert "unet." in message and not (tmp_path / "fused").exists()
    # An SD1.5 checkpoint is not exported against an SDXL base model either.
    with pytest.raises(lora_io.LoraExportError, match="base_model.family = 'sd15'.*is sdxl"):
        lora_io.export_lora(
            ckpt, tmp_path / "x", dataset_name=DATASET, provenance={}, base_model_dir=case.base_dir
        )
    assert SDXL.kohya_base_model_version == "sdxl_base_v1-0"


def test_fit_check_knows_convolutions_and_both_kohya_namings(tmp_path: Path, tiny_sd_cache: Path) -> None:
    """LoCon-style files adapt convolutions ([r, in, k, k]); SD1.5 kohya files may name LDM blocks too."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(
        tiny_sd_path(tiny_sd_cache), subfolder="unet", use_safetensors=True
    )
    conv = unet.down_blocks[0].resnets[0].conv1
    attn = (
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k"  # LDM name of down_blocks.1.attentions.0
    )
    to_k = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    good = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, conv.in_channels, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(conv.out_channels, 4, 1, 1),
        f"{attn}.lora_down.weight": torch.zeros(4, to_k.in_features),
        f"{attn}.lora_up.weight": torch.zeros(to_k.out_features, 4),
    }
    save_file(good, tmp_path / "good.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    lora_io.check_lora_fits(tmp_path / "good.safetensors", unet, SD15)
    bad = {**good, f"{attn}.lora_down.weight": torch.zeros(4, to_k.in_features + 1)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(
        lora_io.LoraMismatchError, match=rf"{attn}\.lora_down\.weight \[4, {to_k.in_features + 1}\]"
    ):
        lora_io.check_lora_fits(tmp_path / "bad.safetensors", unet, SD15)
