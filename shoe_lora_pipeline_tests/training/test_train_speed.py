"""Throughput accounting and the micro-batch/checkpointing choice (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from shoe_lora_pipeline.core import train_speed as speed


def test_sd15_training_flops_per_image_match_the_published_forward_cost():
    from diffusers import UNet2DConditionModel

    from shoe_lora_pipeline.core.models import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    lora = {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}
    flops = speed.training_flops_per_image(unet, lora, (4, 64, 64))
    # ≈ 0.8-0.9 TFLOP per 64×64 forward (matmuls, convolutions, attention); a frozen-base LoRA step is
    # about twice the forward: no weight gradients for the frozen layers.
    assert 1.5e12 < flops < 2.0e12
    assert not getattr(unet, "peft_config", None)  # counted on a ghost copy: the model gets no adapter


def test_mfu_uses_the_peak_of_the_device_and_precision():
    rate = speed.mfu(100.0, 1.8e12, "NVIDIA H200", "bf16")
    assert rate.tflops_per_second == pytest.approx(180.0)
    assert rate.mfu == pytest.approx(180.0 / 989.4)
    assert "MFU 18.2 %" in rate.describe()
    assert speed.device_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert speed.device_peak_tflops("NVIDIA L40S", "bf16") is None  # not the L4
    assert speed.device_peak_tflops("NVIDIA L4", "tf32") == 60.0
    assert "8.0 GFLOP/s" in speed.mfu(1.0, 8e9, "AMD EPYC 7B13", "fp32").describe()
    unknown = speed.mfu(10.0, 1e12, "AMD EPYC 7B13", "fp32")
    assert unknown.mfu is None and "MFU" not in unknown.describe() and "mfu" not in unknown.as_metadata()
    assert (
        speed.peak_precision("no", tf32=True) == "tf32" and speed.peak_precision("bf16", tf32=False) == "bf16"
    )


def test_auto_micro_batch_takes_the_largest_size_that_fits():
    tried = []

    def fits(micro: int, checkpointing: bool) -> bool:
        tried.append((micro, checkpointing))
        return micro <= 4 if not checkpointing else micro <= 8

    layout = speed.choose_micro_batch([16, 8, 4, 2, 1], fits, checkpointing=False)
    assert (layout.micro_batch, layout.gradient_checkpointing) == (4, False)
    assert tried == [(16, False), (8, False), (4, False)]

    tried.clear()
    auto = speed.choose_micro_batch([16, 8, 4, 2, 1], fits, checkpointing="auto")
    # checkpointing only where it is the way to a larger micro-batch
    assert (auto.micro_batch, auto.gradient_checkpointing) == (8, True)
    assert tried == [(16, False), (16, True), (8, False), (8, True)]
    assert "micro-batch 16 with gradient checkpointing on: does not fit" in auto.notes

    with pytest.raises(RuntimeError, match="not even a micro-batch of 1 fits"):
        speed.choose_micro_batch([2, 1], lambda m, c: False, checkpointing=True)
