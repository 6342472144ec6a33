"""Product renders of an SDXL LoRA (tiny-sdxl) from the base model + LoRA: the family's pipeline renders, the
hires pass runs StableDiffusionXLImg2ImgPipeline on the same components, and the A1111 model hash is the
SDXL base model's. (From the fused final_pipeline to published, marked files: dagster/test_pipeline_e2e_sdxl.py.)"""

from pathlib import Path

import numpy as np
import pytest
import torch

from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.models import base_model_identity, tiny_sdxl_path
from shoe_lora_pipeline.core.renders import lora_source, pipeline_loader
from shoe_lora_pipeline.core.renders.hires import HiresPass, HiresSettings, img2img_from
from shoe_lora_pipeline_tests.renders.test_marketplace import white_sneaker
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint
from shoe_lora_pipeline_tests.support.training import one_torch_thread


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_cache: Path) -> Path:
    """training.output_dir with an SDXL lora_weights/ (a random LoRA on tiny-sdxl, exported as the pipeline does)."""
    root = tmp_path_factory.mktemp("lora-sdxl")
    base = tiny_sdxl_path(tiny_sdxl_cache)
    with one_torch_thread():
        ckpt, _ = make_training_checkpoint(root, base, rank=4, alpha=4, step=4, base_model="tiny-sdxl")
        provenance = {"dagster_run_id": "lora-run-xl", "dataset_name": "casual_shoes"}
        lora_io.export_lora(ckpt, root / "lora_weights", dataset_name="casual_shoes", provenance=provenance)
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
