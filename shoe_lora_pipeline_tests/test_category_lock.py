"""The category folder lock (core/category_lock.py) between processes: another run waits, then fails
naming the holder; steps of the same run share it; the kernel lets go when the holder dies. The Dagster
runs (two instances, the data stage and training) are in training/test_run_faults.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoe_lora_pipeline.core import category_lock
from shoe_lora_pipeline.core.category_lock import CategoryLockedError, acquire, acquire_all, release_run
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT


def hold(folder: Path, run_id: str) -> subprocess.Popen:
    """A process that holds ``folder``'s lock for ``run_id`` until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-m", "shoe_lora_pipeline_tests.support.lock_holder", str(folder), run_id],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "casual_shoes"
    for run in ("run-a", "run-b"):
        release_run(run)


def test_another_run_waits_then_fails_naming_the_holder(folder):
    holder = hold(folder, "run-a")
    try:
        with pytest.raises(CategoryLockedError) as err:
            acquire(folder, "run-b", timeout_s=0.3)
        message = str(err.value)
        assert f"run_id run-a, pid {holder.pid}, host {socket.gethostname()}, since " in message
        assert str(folder) in message and "automation.category_lock_timeout_s" in message
        assert category_lock.held_folders() == []
    finally:
        holder.communicate("")  # closing stdin ends it
    acquire(folder, "run-b", timeout_s=0)  # let go by the holder: taken at once
    assert category_lock.read_holder(folder)["pid"] == os.getpid()


def test_the_same_run_shares_the_lock_across_processes(folder):
    holder = hold(folder, "run-a")
    try:
        acquire(folder, "run-a", timeout_s=0)  # e.g. the evaluation and the renders of one run at once
        acquire(folder, "run-a", timeout_s=0)  # re-entrant in one process
        assert category_lock.held_folders() == [str(folder.resolve())]
        assert category_lock.read_holder(folder)["pid"] == holder.pid  # the first holder stays named
    finally:
        holder.communicate("")
    other = subprocess.run(  # run-a still holds it here (this process): run-b fails
        [sys.executable, "-m", "shoe_lora_pipeline_tests.support.lock_holder", str(folder), "run-b"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0 and f"pid {holder.pid}" in other.stderr  # the run's first holder
    assert "CategoryLockedError" in other.stderr and "run_id run-a" in other.stderr
    release_run("run-a")


def test_a_killed_holder_lets_go_at_once(folder):
    holder = hold(folder, "run-a")
    holder.kill()
    holder.wait()
    holder.stdin.close()
    holder.stdout.close()
    acquire(folder, "run-b", timeout_s=0)
    assert category_lock.read_holder(folder)["run_id"] == "run-b"


def test_several_folders_are_taken_in_one_order_and_none_is_kept_on_failure(folder, tmp_path):
    lora = folder / "lora"
    holder = hold(lora, "run-a")
    try:
        with pytest.raises(CategoryLockedError):
            acquire_all([lora, folder], "run-b", timeout_s=0)
        assert category_lock.held_folders() == []  # the dataset folder it had taken first is let go
    finally:
        holder.communicate("")
