"""A full disk during training costs nothing: the step stops with an error naming the folder and its free
space, no partial checkpoint is left, the previous checkpoint loads, and once space is freed the run resumes
and ends with the LoRA of the uninterrupted run, bit for bit. A disk too small for the checkpoints refuses at
the start. On a real tmpfs as root, with an injected ``OSError(ENOSPC)`` otherwise."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline.core.fsutil import DiskFullError
from shoe_lora_pipeline.core.models import load_base_model
from shoe_lora_pipeline.core.run_artifacts import read_losses_csv
from shoe_lora_pipeline_tests.support.disk import FILLER, enospc, fill, small_tmpfs
from shoe_lora_pipeline_tests.support.training import (
    RESUME_SETTINGS,
    assert_same_lora,
    lora_tensors,
    make_cfg,
    one_torch_thread,
    run_training,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_disk_full_at_a_checkpoint_then_resume_bit_identical(
    disk, tmp_path, tiny_sd_cache, dataset, uninterrupted_run, monkeypatch
):
    root = tmp_path / "disk"
    with small_tmpfs(root, 48) if disk == "tmpfs" else _plain(root):
        cfg = make_cfg(root, **RESUME_SETTINGS)
        out = cfg.training.output_dir

        def full_after_step_3(progress: dict) -> None:
            if progress["step"] != 3:
                return
            if disk == "tmpfs":
                fill(root, leave=4096)  # checkpoint-4 (or step 4's losses.csv row) does not fit
            else:
                real = ckpt._fsync_tree
                monkeypatch.setattr(
                    ckpt, "_fsync_tree", lambda f: enospc() if "checkpoint-4" in f.name else real(f)
                )

        with one_torch_thread(), pytest.raises(DiskFullError) as err:
            components = load_base_model("tiny-sd", cache_dir=tiny_sd_cache)
            run_training(cfg, components, dataset, on_progress=full_after_step_3)
        assert err.value.errno == errno.ENOSPC and "the disk is full" in str(err.value)
        assert err.value.folder.is_relative_to(out) and " free" in str(err.value)
        assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [2]
        assert not [p for p in out.rglob("*") if p.name.startswith((".tmp", ".old"))]
        assert ckpt.loading_problem(out / "checkpoints" / "checkpoint-2") is None
        assert "stopped: DiskFullError" in (out / "training_log_full.txt").read_text()

        # Space is freed: the re-run resumes from checkpoint-2 and trains the uninterrupted run's LoRA.
        (root / FILLER).unlink(missing_ok=True)
        monkeypatch.undo()
        with one_torch_thread():
            result = run_training(cfg, load_base_model("tiny-sd", cache_dir=tiny_sd_cache), dataset)
        assert result.resumed_from == 2
        assert_same_lora(lora_tensors(result.checkpoint_dir), uninterrupted_run["lora"])
        numbers = lambda rows: [{k: r[k] for k in ("step", "loss", "lr", "grad_norm")} for r in rows]  # noqa: E731
        assert numbers(read_losses_csv(out / "losses.csv")) == numbers(uninterrupted_run["losses"])


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_training_refuses_to_start_without_room_for_its_checkpoints(
    disk, tmp_path, tiny_sd_cache, dataset, monkeypatch
):
    root = tmp_path / "disk"
    with small_tmpfs(root, 2) if disk == "tmpfs" else _plain(root):
        if disk == "injected":
            monkeypatch.setattr(ckpt, "free_bytes", lambda folder: 2 << 20)
        cfg = make_cfg(root, **RESUME_SETTINGS)
        with one_torch_thread(), pytest.raises(ckpt.InsufficientSpaceError) as err:
            run_training(cfg, load_base_model("tiny-sd", cache_dir=tiny_sd_cache), dataset)
        message = str(err.value)
        assert "not enough disk space to train in" in message and "2.0 MiB free" in message
        assert "checkpoints_total_limit 10 + 1 while rotating, 0 on disk" in message
        assert not (cfg.training.output_dir / "checkpoints").exists()


class _plain:
    """The folder as it is (the injected-error variant)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
