"""Checkpoints: layout, LoRA-only weights, atomic save (exception and SIGKILL mid-save), rotation, cleanup."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shoe_lora_pipeline.core import checkpoints as ckpt
from shoe_lora_pipeline_tests.support.training import (
    RESUME_SETTINGS,
    assert_same_lora,
    lora_tensors,
    make_cfg,
    run_training,
)

EXPECTED_FILES = {
    "pytorch_lora_weights.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    "losses.csv",
    "training_state.json",
}


def fake_checkpoint(root: Path, step: int, complete: bool = True, content: bytes = b"lora") -> Path:
    path = root / ckpt.checkpoint_name(step)
    path.mkdir(parents=True)
    (path / ckpt.LORA_WEIGHTS_NAME).write_bytes(content)
    if complete:
        (path / ckpt.STATE_NAME).write_text(json.dumps({"global_step": step}))
    return path


class StubAccelerator:
    """Writes a LoRA file like the real save hook would; can fail halfway through."""

    is_main_process = True

    def __init__(self, content: bytes, fail: bool = False) -> None:
        self.content, self.fail = content, fail

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        (Path(output_dir) / ckpt.LORA_WEIGHTS_NAME).write_bytes(self.content)
        if self.fail:
            raise OSError("No space left on device (simulated)")
        (Path(output_dir) / "optimizer.bin").write_bytes(b"opt")


def test_checkpoint_layout_and_lora_only_weights(uninterrupted_run):
    result = uninterrupted_run["result"]
    ckpt_dir = result.checkpoint_dir
    assert ckpt_dir.name == "checkpoint-8"
    assert {p.name for p in ckpt_dir.iterdir()} == EXPECTED_FILES  # no model.safetensors: no frozen weights

    state = json.loads((ckpt_dir / ckpt.STATE_NAME).read_text())
    assert state["global_step"] == 8
    assert state["lora"] == {
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
    }
    assert {
        "training_hash",
        "dataset_fingerprint",
        "base_model",
        "epoch",
        "position",
        "training_config",
    } <= state.keys()
    # 6 items, 4 samples per step: 8 steps = 32 samples -> the next sample is epoch 5 (0-based), position 2
    assert (state["epoch"], state["position"]) == (5, 2)
    assert (state["micro_batch_size"], state["num_processes"]) == (2, 1)

    with safe_open(str(ckpt_dir / ckpt.LORA_WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") and ".lora." in k for k in keys)
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8
    assert all(t.dtype == torch.float32 for t in lora_tensors(ckpt_dir).values())


def test_rotation_keeps_newest_by_step_number_not_name(tmp_path):
    for step in (2, 4, 10, 12):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 14, complete=False)  # incomplete: neither counted nor deleted
    removed = ckpt.rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-12", "checkpoint-14"]
    assert ckpt.newest_checkpoint(tmp_path).step == 12


def test_clean_stale_tmp_removes_leftovers_and_restores_an_aside_checkpoint(tmp_path):
    (tmp_path / ".tmp-checkpoint-6-123").mkdir()
    fake_checkpoint(tmp_path, 4).rename(tmp_path / ".old-checkpoint-4-99")  # crash between the two renames
    fake_checkpoint(tmp_path, 2)
    (tmp_path / ".old-checkpoint-2-98").mkdir()  # crash after the new one was in place
    actions = ckpt.clean_stale_tmp(tmp_path)
    assert len(actions) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert ckpt.is_complete(tmp_path / "checkpoint-4")


def test_existing_checkpoint_replaced_only_by_a_complete_one(tmp_path):
    ckpt.save_checkpoint(StubAccelerator(b"first"), tmp_path, 4, {})
    ckpt.save_checkpoint(StubAccelerator(b"second"), tmp_path, 4, {})
    assert (tmp_path / "checkpoint-4" / ckpt.LORA_WEIGHTS_NAME).read_bytes() == b"second"
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(StubAccelerator(b"broken", fail=True), tmp_path, 4, {})
    assert (tmp_path / "checkpoint-4" / ckpt.LORA_WEIGHTS_NAME).read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]  # no tmp or aside folder left


def test_compatibility_problems_name_what_differs():
    base = {"training_hash": "a" * 64, "training_config": {"learning_rate": 1e-3}, "dataset_fingerprint": "d1",
            "base_model": {"base_model": "tiny-sd", "fingerprint": "f1"}}  # fmt: skip
    assert ckpt.compatibility_problems(base, base) == []
    now = {**base, "training_hash": "b" * 64, "training_config": {"learning_rate": 2e-3},
           "dataset_fingerprint": "d2", "base_model": {"base_model": "tiny-sd", "fingerprint": "f2"}}  # fmt: skip
    problems = ckpt.compatibility_problems(base, now)
    assert len(problems) == 3
    assert "learning_rate: 0.001 -> 0.002" in problems[0]
    assert "dataset_fingerprint" in problems[1] and "base model fingerprint" in problems[2]


def test_exception_during_save_keeps_previous_checkpoint(tmp_path, load_components, dataset, monkeypatch):
    import accelerate.accelerator

    real = accelerate.accelerator.save_accelerator_state

    def fail_in_second_checkpoint(output_dir, *args, **kwargs):
        # The LoRA file is already written by then: the save fails halfway through.
        if "checkpoint-4" in str(output_dir):
            raise OSError("No space left on device (simulated)")
        return real(output_dir, *args, **kwargs)

    monkeypatch.setattr(accelerate.accelerator, "save_accelerator_state", fail_in_second_checkpoint)
    cfg = make_cfg(tmp_path, max_train_steps=4, checkpointing_steps=2)
    with pytest.raises(OSError, match="No space left"):
        run_training(cfg, load_components(), dataset)
    root = cfg.training.output_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"]  # no checkpoint-4, no tmp folder
    assert ckpt.is_complete(root / "checkpoint-2")
    assert lora_tensors(root / "checkpoint-2")  # still readable
    assert "stopped: OSError" in (cfg.training.output_dir / "training_log_full.txt").read_text()


CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from shoe_lora_pipeline.core import checkpoints
    from shoe_lora_pipeline.core.models import load_base_model
    import torch
    from shoe_lora_pipeline_tests.support.training import RESUME_SETTINGS, make_cfg, run_training

    torch.set_num_threads(1)  # as in the parent's runs, which this one is compared with
    args = json.loads(sys.argv[1])
    real_fsync_tree = checkpoints._fsync_tree

    def signal_then_hang(folder):
        real_fsync_tree(folder)
        if "checkpoint-4" in folder.name:
            # Every file of checkpoint-4 is written and synced, the rename has not happened: the worst moment.
            os.write(args["fd"], folder.name.encode())
            while True:
                time.sleep(60)

    checkpoints._fsync_tree = signal_then_hang
    cfg = make_cfg(Path(args["root"]), **RESUME_SETTINGS)
    data = {k: Path(v) if k != "fingerprint" else v for k, v in args["data"].items()}
    run_training(cfg, load_base_model("tiny-sd", cache_dir=Path(args["cache"])), data)
    """
)


def test_sigkill_during_save_then_resume_is_bit_identical(
    tmp_path, tiny_sd_cache, load_components, dataset, uninterrupted_run
):
    read_fd, write_fd = os.pipe()
    args = {
        "fd": write_fd,
        "root": str(tmp_path),
        "cache": str(tiny_sd_cache),
        "data": {k: str(v) for k, v in dataset.items()},
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 180)
        signal = os.read(read_fd, 100) if ready else b""
        if not signal:  # the child died (EOF) or hung before reaching the save
            child.kill()
            pytest.fail(
                f"child never reached the save of checkpoint-4: {child.communicate()[1].decode()[-3000:]}"
            )
        child.kill()  # SIGKILL: no cleanup handlers run
        child.wait(timeout=30)
    finally:
        os.close(read_fd)
        if child.poll() is None:
            child.kill()
        child.stderr.close()

    cfg = make_cfg(tmp_path, **RESUME_SETTINGS)
    root = cfg.training.output_dir / "checkpoints"
    tmp_name = signal.decode()
    assert tmp_name.startswith(".tmp-checkpoint-4-")
    assert (root / tmp_name / ckpt.STATE_NAME).is_file()  # complete-looking, yet never published
    assert not (root / "checkpoint-4").exists()
    assert [c.step for c in ckpt.list_checkpoints(root)] == [2]

    result = run_training(cfg, load_components(), dataset)
    assert result.resumed_from == 2
    assert not (root / tmp_name).exists()
    assert f"removed unfinished checkpoint save {tmp_name}" in result.log_path.read_text()
    # Resumed in another process than the one that trained steps 1-2: still bit-identical.
    assert_same_lora(lora_tensors(result.checkpoint_dir), uninterrupted_run["lora"])


def copy_checkpoints(source: Path, target_root: Path, steps: list[int]) -> Path:
    root = target_root / "checkpoints"
    for step in steps:
        shutil.copytree(source / ckpt.checkpoint_name(step), root / ckpt.checkpoint_name(step))
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated LoRA": lambda c: truncate(c / ckpt.LORA_WEIGHTS_NAME),
    "missing optimizer.bin": lambda c: (c / "optimizer.bin").unlink(),
    "truncated optimizer.bin": lambda c: truncate(c / "optimizer.bin"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_newest_checkpoint_that_does_not_load_is_set_aside(tmp_path, uninterrupted_run, damage):
    source = uninterrupted_run["result"].output_dir / "checkpoints"
    root = copy_checkpoints(source, tmp_path, [4, 6])
    DAMAGES[damage](root / "checkpoint-6")
    saved = json.loads((root / "checkpoint-6" / ckpt.STATE_NAME).read_text())
    current = {k: saved[k] for k in ("training_hash", "training_config", "dataset_fingerprint", "base_model")}

    start = ckpt.decide_start(root, current, max_train_steps=8)
    assert start.resume_from.step == 4
    assert start.note == "resumed from checkpoint-4 (step 4 of 8)"
    (warning,) = start.log_lines
    assert warning.startswith("warning: checkpoint checkpoint-6 does not load (")
    assert "moved to broken-checkpoint-6" in warning
    assert sorted(p.name for p in root.iterdir()) == [
        "broken-checkpoint-6",
        "checkpoint-4",
    ]  # kept, not loaded


def test_training_resumes_past_a_truncated_newest_checkpoint(
    tmp_path, load_components, dataset, uninterrupted_run
):
    cfg = make_cfg(tmp_path, **RESUME_SETTINGS)
    root = copy_checkpoints(
        uninterrupted_run["result"].output_dir / "checkpoints", cfg.training.output_dir, [4, 6]
    )
    truncate(root / "checkpoint-6" / ckpt.LORA_WEIGHTS_NAME)
    result = run_training(cfg, load_components(), dataset)
    assert result.resumed_from == 4
    log = result.log_path.read_text()
    assert (
        "warning: checkpoint checkpoint-6 does not load (pytorch_lora_weights.safetensors does not load"
        in log
    )
    assert_same_lora(lora_tensors(result.checkpoint_dir), uninterrupted_run["lora"])
