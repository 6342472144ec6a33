"""The training objective's options (min-SNR-γ, noise offset, caption dropout) against their reference
formulas, and the held-out validation loss: deterministic, and without effect on training."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler

from shoe_lora_pipeline.core import training
from shoe_lora_pipeline.core.lora_io import LoraExportError, select_checkpoint
from shoe_lora_pipeline.core.models import SD15_SCHEDULER_CONFIG
from shoe_lora_pipeline.core.run_artifacts import read_validation_losses
from shoe_lora_pipeline.core.train_data import NoiseSettings, derived_seed, draw_samples
from shoe_lora_pipeline_tests.support.training import (
    assert_same_lora,
    lora_tensors,
    make_cfg,
    run_training,
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_reference_scripts_formula(prediction_type):
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    timesteps = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    gamma = 5.0
    # diffusers' train_text_to_image_lora.py, written out: min(SNR, γ) / SNR, with SNR + 1 for v-prediction
    snr = compute_snr(scheduler, timesteps)
    if prediction_type == "v_prediction":
        snr = snr + 1
    expected = torch.stack([compute_snr(scheduler, timesteps), gamma * torch.ones_like(timesteps)], dim=1)
    expected = expected.min(dim=1)[0] / snr
    torch.testing.assert_close(training.min_snr_weights(scheduler, timesteps, gamma), expected)


def test_noise_offset_is_the_peers_per_channel_offset():
    settings = NoiseSettings(noise_offset=0.1)
    drawn = draw_samples(7, 3, [0, 1], (4, 8, 8), 1000, settings)
    for j in (0, 1):
        # the sample's own generator, in the documented order: eps, noise, timestep, dropout coin, offset
        g = torch.Generator().manual_seed(derived_seed(7, "sample", 3, j))
        torch.randn((4, 8, 8), generator=g)
        noise = torch.randn((4, 8, 8), generator=g)
        torch.randint(0, 1000, (1,), generator=g)
        torch.rand((1,), generator=g)
        # noise += noise_offset * randn(b, c, 1, 1), as in the peers' trainers
        expected = noise + 0.1 * torch.randn((4, 1, 1), generator=g)
        torch.testing.assert_close(drawn["noise"][j], expected)


def test_caption_dropout_trains_on_the_empty_caption(load_components):
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
            seen["text"] = encoder_hidden_states
            return (torch.zeros_like(sample),)

    from shoe_lora_pipeline.core.train_data import MicroBatch, SourceBatch

    class Source:
        def get(self, items):
            return SourceBatch(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), torch.ones(2, 3, 5))

    drawn = torch.tensor([True, False])
    batch = MicroBatch(
        0, [0, 1], [0, 1], 0, *(torch.zeros(2, 4, 2, 2) for _ in range(3)), torch.tensor([5, 5]), drawn
    )
    empty = torch.full((3, 5), -1.0)
    training.diffusion_loss(
        Recorder(), load_components().noise_scheduler, batch, Source(), empty, 1.0, torch.float32
    )
    assert torch.equal(seen["text"][0], empty) and torch.equal(seen["text"][1], torch.ones(3, 5))


def test_validation_loss_is_deterministic_and_does_not_touch_training(tmp_path, load_components, dataset):
    settings = {"max_train_steps": 4, "validation_steps": 2}
    first = run_training(make_cfg(tmp_path / "a", **settings), load_components(), dataset, with_val=True)
    second = run_training(make_cfg(tmp_path / "b", **settings), load_components(), dataset, with_val=True)
    without = run_training(make_cfg(tmp_path / "c", **settings), load_components(), dataset)

    rows = read_validation_losses(tmp_path / "a" / "lora" / "validation_loss.csv")
    assert [r["step"] for r in rows] == [2, 4]
    assert set(rows[0]) == {"step", "val_loss", "t125", "t375", "t625", "t875"}
    assert (tmp_path / "a" / "lora" / "validation_loss.csv").read_bytes() == (
        tmp_path / "b" / "lora" / "validation_loss.csv"
    ).read_bytes()
    assert not (tmp_path / "c" / "lora" / "validation_loss.csv").exists()
    assert_same_lora(lora_tensors(first.checkpoint_dir), lora_tensors(without.checkpoint_dir))
    assert first.val_loss == rows[-1]["val_loss"] and first.best_val_step in (2, 4)
    assert "validation loss at step 4" in first.log_path.read_text()
    # the checkpoint carries the rows, so a resumed run and the export read the same numbers
    assert read_validation_losses(first.checkpoint_dir / "validation_loss.csv") == rows
    assert second.val_loss == first.val_loss


@pytest.mark.parametrize(
    "option",
    [{"snr_gamma": 1.0}, {"noise_offset": 0.1}, {"input_perturbation": 0.1}, {"caption_dropout": 0.5}],
)
def test_each_objective_option_changes_the_lora(tmp_path, load_components, dataset, option, request):
    baseline_dir = tmp_path.parent / "objective-baseline"
    baseline = run_training(make_cfg(baseline_dir, max_train_steps=2), load_components(), dataset)
    changed = run_training(make_cfg(tmp_path, max_train_steps=2, **option), load_components(), dataset)
    a, b = lora_tensors(baseline.checkpoint_dir), lora_tensors(changed.checkpoint_dir)
    assert any(not torch.equal(a[k], b[k]) for k in a), option
    assert make_cfg(tmp_path, **option).training_hash() != make_cfg(tmp_path).training_hash()


def test_export_best_picks_the_kept_checkpoint_with_the_lowest_validation_loss(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"x")
        (folder / "training_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "validation_loss.csv").write_text("step,val_loss\n1,0.01\n2,0.3\n4,0.1\n6,0.2\n")
    # step 1 is lower still, but no checkpoint of it was kept
    assert select_checkpoint(root, "best", tmp_path).step == 4
    assert select_checkpoint(root, None, tmp_path).step == 6
    assert select_checkpoint(root, 2, tmp_path).step == 2
    (tmp_path / "validation_loss.csv").unlink()
    with pytest.raises(LoraExportError, match="no validation loss was measured at a kept checkpoint"):
        select_checkpoint(root, "best", tmp_path)
    with pytest.raises(LoraExportError, match="checkpoint_step = 5: no such checkpoint"):
        select_checkpoint(root, 5, tmp_path)
