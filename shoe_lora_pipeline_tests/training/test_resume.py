"""Resume: bit-identical continuation mid-epoch, incompatible settings, skip when done, non-finite loss."""

from __future__ import annotations

import json

import pytest

from shoe_lora_pipeline.core.checkpoints import list_checkpoints
from shoe_lora_pipeline.core.run_artifacts import read_losses_csv
from shoe_lora_pipeline.core.training import TrainingError
from shoe_lora_pipeline_tests.support.training import (
    RESUME_SETTINGS,
    assert_same_lora,
    lora_tensors,
    make_cfg,
    run_training,
)


class _HardStop(Exception):
    """Stands in for a crash: raised from inside the loop, no clean shutdown."""


def test_resume_after_hard_stop_is_bit_identical(tmp_path, load_components, dataset, uninterrupted_run):
    cfg = make_cfg(tmp_path, **RESUME_SETTINGS)
    assert cfg.training_hash() == uninterrupted_run["cfg"].training_hash()

    def stop_at_5(progress):
        if progress["step"] == 5:
            raise _HardStop("simulated crash after step 5")

    with pytest.raises(_HardStop):
        run_training(cfg, load_components(), dataset, on_progress=stop_at_5)
    out = cfg.training.output_dir
    assert [c.step for c in list_checkpoints(out / "checkpoints")] == [2, 4]
    assert [r["step"] for r in read_losses_csv(out / "losses.csv")] == [1, 2, 3, 4, 5]

    result = run_training(cfg, load_components(), dataset)
    assert result.resumed_from == 4
    assert "resumed from checkpoint-4" in result.resume_note
    assert result.global_step == 8 and result.steps_this_run == 4
    assert "resumed from checkpoint-4" in (out / "training_log_full.txt").read_text()

    # Same LoRA weights, bit for bit, as the run that was never interrupted …
    assert_same_lora(lora_tensors(result.checkpoint_dir), uninterrupted_run["lora"])
    # … and the same per-step log, including the steps after the resume point (step 5 appears once).
    losses = read_losses_csv(out / "losses.csv")
    reference = uninterrupted_run["losses"]
    assert [r["step"] for r in losses] == list(range(1, 9))
    for got, want in zip(losses, reference, strict=True):
        assert (got["step"], got["epoch"], got["loss"], got["lr"], got["grad_norm"]) == (
            want["step"],
            want["epoch"],
            want["loss"],
            want["lr"],
            want["grad_norm"],
        )


def test_changed_setting_starts_fresh_naming_it_and_keeps_old_checkpoints(tmp_path, load_components, dataset):
    cfg = make_cfg(tmp_path, max_train_steps=2)
    run_training(cfg, load_components(), dataset)

    changed = make_cfg(tmp_path, max_train_steps=2, learning_rate=2e-3, checkpointing_steps=1)
    result = run_training(changed, load_components(), dataset)
    assert result.resumed_from is None and not result.skipped
    assert "training.learning_rate: 0.001 -> 0.002" in result.resume_note
    assert "checkpointing_steps" not in result.resume_note  # cadence does not change results
    ckpts = changed.training.output_dir / "checkpoints"
    superseded = [p for p in ckpts.iterdir() if p.name.startswith("superseded-")]
    assert len(superseded) == 1
    assert (superseded[0] / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert (superseded[0] / "losses.csv").is_file()
    assert [c.step for c in list_checkpoints(ckpts)] == [1, 2]
    assert "training.learning_rate" in (changed.training.output_dir / "training_log_full.txt").read_text()


def test_nothing_changed_second_call_is_skipped(tmp_path, load_components, dataset):
    cfg = make_cfg(tmp_path, max_train_steps=2)
    first = run_training(cfg, load_components(), dataset)
    second = run_training(cfg, load_components(), dataset)
    assert second.skipped and second.steps_this_run == 0
    assert second.global_step == 2 and second.checkpoint_dir == first.checkpoint_dir
    assert [r["loss"] for r in second.losses] == [r["loss"] for r in first.losses]
    assert second.trainable_params == first.trainable_params
    assert json.loads((cfg.training.output_dir / "training_summary.json").read_text())["global_step"] == 2


def test_changed_dataset_fingerprint_starts_fresh(tmp_path, load_components, dataset):
    cfg = make_cfg(tmp_path, max_train_steps=1)
    run_training(cfg, load_components(), dataset)
    result = run_training(
        cfg, load_components(), {**dataset, "fingerprint": "another-dataset"}, max_steps_this_run=0
    )
    assert result.resumed_from is None
    assert "dataset_fingerprint differs" in result.resume_note


def test_non_finite_loss_stops_without_checkpoint(tmp_path, load_components, dataset, monkeypatch):
    import shoe_lora_pipeline.core.training.loop as training  # the loop looks diffusion_loss up here

    real_loss = training.diffusion_loss
    calls = {"n": 0}

    def nan_on_7th_micro_batch(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(training, "diffusion_loss", nan_on_7th_micro_batch)
    cfg = make_cfg(tmp_path, max_train_steps=6, checkpointing_steps=2)
    with pytest.raises(TrainingError, match=r"optimizer step 4, micro-batch 1/2") as err:
        run_training(cfg, load_components(), dataset)
    assert "images ['1000" in str(err.value) and "checkpoint-2" in str(err.value)
    ckpts = cfg.training.output_dir / "checkpoints"
    assert [c.step for c in list_checkpoints(ckpts)] == [2]
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]

    # the next call resumes from the last good checkpoint
    monkeypatch.setattr(training, "diffusion_loss", real_loss)
    assert run_training(cfg, load_components(), dataset, max_steps_this_run=1).resumed_from == 2
