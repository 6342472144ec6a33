"""The exported LoRA gives the trained model's output through every loader a user would use.

Same latents, timestep and text embedding; the UNet output of the in-memory adapted model (the one the
trainer saved) is compared with the LoRA loaded through
  (a) PeftModel.from_pretrained(fresh_unet, lora_weights_dir)             -- PEFT files
  (b) pipe.load_lora_weights(lora_weights_dir)                            -- diffusers file
  (c) pipe.load_lora_weights(dir, weight_name="<name>_lora.safetensors")  -- kohya file, diffusers' kohya loader
  (d) StableDiffusionPipeline.from_pretrained(final_pipeline).unet        -- fused weights
Tolerance (fp32, CPU): atol 1e-5, rtol 1e-4 -- rounding only; a wrong alpha/rank scale is off by O(0.1).
alpha != rank in both cases (4/16 -> scale 4, 8/16 -> scale 2): a loader assuming alpha = rank fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.models import tiny_sd_path
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint

ATOL, RTOL = 1e-5, 1e-4
DATASET = "casual_shoes"


@dataclass
class Case:
    rank: int
    alpha: float
    base_dir: Path
    lora_dir: Path
    fused_dir: Path
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    reference: torch.Tensor  # in-memory adapted UNet
    base_output: torch.Tensor  # UNet without LoRA


def unet_out(unet: Any, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    latents, t, text = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=text).sample


def load_pipe(path: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None)


@pytest.fixture(scope="module", params=[(4, 16.0), (8, 16.0)], ids=["r4a16", "r8a16"])
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_sd_cache: Path
) -> Case:
    rank, alpha = request.param
    base_dir = tiny_sd_path(tiny_sd_cache)
    root = tmp_path_factory.mktemp(f"train-r{rank}")
    ckpt, unet = make_training_checkpoint(root, base_dir, rank=rank, alpha=alpha, seed=rank)
    lora_dir = root / "lora_weights"
    lora_io.export_lora(ckpt, lora_dir, dataset_name=DATASET, provenance={"dagster_run_id": "r"})
    fused_dir = lora_io.fuse_lora_pipeline(base_dir, lora_dir, root / "final_pipeline")

    gen = torch.Generator().manual_seed(123)
    # 16x16 latents (128 px images); text embedding [77, 64] as the tiny CLIP produces.
    inputs = (
        torch.randn(1, 4, 16, 16, generator=gen),
        torch.tensor([500]),
        torch.randn(1, 77, 64, generator=gen),
    )
    reference = unet_out(unet, inputs)
    unet.disable_adapters()
    base_output = unet_out(unet, inputs)
    return Case(rank, alpha, base_dir, lora_dir, fused_dir, inputs, reference, base_output)


def assert_matches(case: Case, output: torch.Tensor) -> None:
    torch.testing.assert_close(output, case.reference, atol=ATOL, rtol=RTOL)
    print(f"r{case.rank}/a{case.alpha:g}: max |diff| = {(output - case.reference).abs().max().item():.2e}")


def test_lora_changes_the_output(case: Case) -> None:
    # Guards against a vacuous suite: zero lora_B (peft's init) would make every comparison pass.
    assert (case.reference - case.base_output).abs().max() > 1e-2


def test_peft_from_pretrained_matches(case: Case) -> None:
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    fresh = UNet2DConditionModel.from_pretrained(case.base_dir, subfolder="unet", use_safetensors=True)
    model = PeftModel.from_pretrained(fresh, str(case.lora_dir))
    assert_matches(case, unet_out(model.eval(), case.inputs))


def test_diffusers_load_lora_weights_matches(case: Case) -> None:
    pipe = load_pipe(case.base_dir)
    pipe.load_lora_weights(str(case.lora_dir))  # picks pytorch_lora_weights.safetensors by itself
    assert_matches(case, unet_out(pipe.unet, case.inputs))


def test_kohya_file_through_diffusers_kohya_loader_matches(case: Case) -> None:
    pipe = load_pipe(case.base_dir)
    pipe.load_lora_weights(str(case.lora_dir), weight_name=f"{DATASET}_lora.safetensors")
    assert_matches(case, unet_out(pipe.unet, case.inputs))


def test_kohya_alpha_written_as_rank_does_not_match(case: Case, tmp_path: Path) -> None:
    """Negative control: the file diffusers' converter would write (.alpha = rank) gives another output."""
    from safetensors.torch import load_file, save_file

    sd = load_file(case.lora_dir / f"{DATASET}_lora.safetensors")
    for key in [k for k in sd if k.endswith(".alpha")]:
        sd[key] = torch.tensor(float(case.rank))
    save_file(sd, tmp_path / "alpha_is_rank.safetensors")
    pipe = load_pipe(case.base_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name="alpha_is_rank.safetensors")
    wrong = unet_out(pipe.unet, case.inputs)
    assert not torch.allclose(wrong, case.reference, atol=ATOL, rtol=RTOL)
    assert (wrong - case.reference).abs().max() > 1e-2


def test_fused_pipeline_matches(case: Case) -> None:
    pipe = load_pipe(case.fused_dir)
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    assert_matches(case, unet_out(pipe.unet, case.inputs))
    record = lora_io.read_provenance(case.fused_dir)
    assert record["format"] == "fused_pipeline" and record["lora"]["fused_scale"] == 1.0
    assert record["lora"]["alpha"] == case.alpha and record["provenance"]["dagster_run_id"] == "r"


@pytest.mark.parametrize("case", [(8, 16.0)], indirect=True, ids=["r8a16"])  # one generation run is enough
def test_fused_pipeline_generates_an_image(case: Case) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(case.fused_dir))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "A professional product photo of black casual shoes on white background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
