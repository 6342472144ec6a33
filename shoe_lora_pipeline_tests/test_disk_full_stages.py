"""A full disk (an injected ``OSError(ENOSPC)`` at the lowest write each stage makes) in the later stages:
export, renders, publishing. The step fails with a DiskFullError that names the folder; the previous
output stays as it was and no temporary folder is left. Cleaning, captions, checkpoints and losses.csv are
in test_disk_full.py and training/test_disk_full.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from shoe_lora_pipeline.core import lora_io
from shoe_lora_pipeline.core.fsutil import DiskFullError
from shoe_lora_pipeline.core.models import tiny_sd_path
from shoe_lora_pipeline_tests.support.disk import enospc
from shoe_lora_pipeline_tests.support.export import make_training_checkpoint
from shoe_lora_pipeline_tests.support.training import one_torch_thread


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or ".staging" in p.name)


def assert_disk_full(err: DiskFullError, folder: Path) -> None:
    assert err.errno == errno.ENOSPC and err.folder == folder
    assert f"the disk is full writing in {folder} (" in str(err) and " free)" in str(err)


def test_export_on_a_full_disk_keeps_the_previous_lora_weights(tmp_path, tiny_sd_cache, monkeypatch):
    import safetensors.torch
    from safetensors.torch import load_file

    base = tiny_sd_path(tiny_sd_cache)
    out = tmp_path / "lora_weights"
    with one_torch_thread():
        ckpt, _ = make_training_checkpoint(tmp_path, base, rank=4, alpha=4, step=4)
        export = lambda: lora_io.export_lora(  # noqa: E731
            ckpt, out, dataset_name="casual_shoes", provenance={"dagster_run_id": "r1"}
        )
        first = export()
        before = snapshot(out)
        # The kohya file's write (safetensors, the lowest call export makes) finds the disk full.
        monkeypatch.setattr(safetensors.torch, "save_file", enospc)
        with pytest.raises(DiskFullError) as err:
            export()
    assert_disk_full(err.value, tmp_path)
    assert snapshot(out) == before
    assert temporaries(tmp_path) == []
    assert sorted(load_file(first.kohya_weights))  # the previous set still loads
    assert lora_io.read_provenance(first.kohya_weights)
