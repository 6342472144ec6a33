"""A full disk at a write: the error says so (folder, free space), the partial file or folder is removed,
what was there before stays. On a real small tmpfs when the tests run as root, with an injected
``OSError(ENOSPC)`` otherwise; the training's checkpoints and resume are in training/test_disk_full.py."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from shoe_lora_pipeline.assets import category_assets
from shoe_lora_pipeline.core import fsutil
from shoe_lora_pipeline.core.fsutil import DiskFullError
from shoe_lora_pipeline.core.run_artifacts import append_rows_csv, read_rows_csv
from shoe_lora_pipeline.resources import PipelineConfigResource
from shoe_lora_pipeline_tests.support.disk import FILLER, enospc, fill, small_tmpfs

BIG = "x" * 400_000  # larger than the little room left on the full tmpfs


@pytest.fixture(params=["tmpfs", "injected"])
def full_disk(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A folder and ``make_full()``, which leaves its disk (nearly) full or makes every write fail."""
    if request.param == "tmpfs":
        with small_tmpfs(tmp_path / "disk", 2) as disk:
            yield disk, lambda: fill(disk, leave=8192) and None
        return
    disk = tmp_path / "disk"
    disk.mkdir()

    def make_full() -> None:
        monkeypatch.setattr(fsutil, "fsync_file", enospc)
        monkeypatch.setattr(fsutil.os, "write", enospc)

    yield disk, make_full


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def assert_names_the_disk(err: DiskFullError, folder: Path) -> None:
    assert err.errno == errno.ENOSPC and err.folder == folder
    assert "the disk is full" in str(err) and str(folder) in str(err) and " free" in str(err)


def test_atomic_text_and_json_keep_the_old_file(full_disk):
    disk, make_full = full_disk
    fsutil.atomic_write_json(disk / "captions.json", {"old": True})
    make_full()
    with pytest.raises(DiskFullError) as err:
        fsutil.atomic_write_json(disk / "captions.json", {"new": BIG})
    assert_names_the_disk(err.value, disk)
    assert json.loads((disk / "captions.json").read_text()) == {"old": True}
    with pytest.raises(DiskFullError):
        fsutil.atomic_write_text(disk / "report.md", BIG)
    assert not (disk / "report.md").exists()
    assert leftovers(disk) == []


def test_atomic_png_and_directory_keep_the_previous_set(full_disk):
    disk, make_full = full_disk
    with fsutil.atomic_directory(disk / "published") as tmp:
        (tmp / "a.png").write_text("previous")
    make_full()
    noise = Image.effect_noise((512, 512), 64).convert("RGB")  # does not compress below the room left
    with pytest.raises(DiskFullError) as err:
        fsutil.atomic_save_png(disk / "grid.png", noise)
    assert_names_the_disk(err.value, disk)
    with pytest.raises(DiskFullError) as err, fsutil.atomic_directory(disk / "published") as tmp:
        fsutil.atomic_save_png(tmp / "b.png", noise)
    assert [p.name for p in (disk / "published").iterdir()] == ["a.png"]
    assert (disk / "published" / "a.png").read_text() == "previous"
    assert not (disk / "grid.png").exists() and leftovers(disk) == []
    assert sorted(p.name for p in disk.iterdir() if not p.name.startswith(".filler")) == ["published"]


def test_an_append_that_does_not_fit_leaves_no_torn_line(full_disk):
    disk, make_full = full_disk
    losses = disk / "losses.csv"
    append_rows_csv(losses, [{"step": 1, "loss": 0.5}], ["step", "loss"])
    before = losses.read_bytes()
    make_full()
    with pytest.raises(DiskFullError) as err:
        append_rows_csv(losses, [{"step": 2, "loss": 0.25, "note": BIG}], ["step", "loss", "note"])
    assert_names_the_disk(err.value, disk)
    assert losses.read_bytes() == before
    assert read_rows_csv(losses) == [{"step": 1, "loss": 0.5}]


def test_quota_and_io_errors_are_named_too(tmp_path):
    for code, words in ((errno.EDQUOT, "quota is exhausted"), (errno.EIO, "I/O error")):
        with pytest.raises(DiskFullError, match=words), fsutil.disk_full_guard(tmp_path):
            raise OSError(code, "boom")
    with pytest.raises(PermissionError), fsutil.disk_full_guard(tmp_path):  # other errors pass unchanged
        raise PermissionError(errno.EACCES, "denied")


def test_the_error_crosses_process_boundaries():
    import pickle

    err = DiskFullError(Path("/x"), 123, OSError(errno.ENOSPC, "No space left on device"))
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.folder, back.free_bytes, str(back)) == (DiskFullError, Path("/x"), 123, str(err))


def test_cleaning_on_a_full_disk_keeps_the_last_complete_run(full_disk, tmp_path, monkeypatch):
    from shoe_lora_pipeline.core import normalise
    from shoe_lora_pipeline.core.cleaning import CleaningParams, clean_images
    from shoe_lora_pipeline.core.config import CleaningConfig
    from shoe_lora_pipeline.core.manifest import scan_raw_dir
    from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR

    disk, make_full = full_disk
    raw, out = tmp_path / "raw", disk / "cleaned"
    raw.mkdir()
    photos = sorted(DEMO_RAW_DIR.glob("100*.jpg"))[:6]
    params = CleaningParams.from_config(CleaningConfig(), 128)
    for p in photos[:3]:
        shutil.copy2(p, raw / p.name)
    clean_images(scan_raw_dir(raw).manifest, out, params, workers=1)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    for p in photos[3:]:
        shutil.copy2(p, raw / p.name)
    make_full()
    if not (disk / FILLER).exists():  # the injected variant: the staged PNG's write fails
        monkeypatch.setattr(normalise, "save_png", enospc)
    with pytest.raises(DiskFullError) as err:
        clean_images(scan_raw_dir(raw).manifest, out, params, workers=1)
    assert err.value.folder == out and "the disk is full" in str(err.value)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out / ".clean_staging").exists()


def test_the_data_stage_step_says_the_disk_is_full_and_keeps_the_old_captions(tmp_path, monkeypatch):
    from shoe_lora_pipeline_tests.data.test_dataset_assets import materialize_data, write_config
    from shoe_lora_pipeline_tests.support.paths import DEMO_RAW_DIR

    raw = tmp_path / "raw"
    raw.mkdir()
    photos = sorted(DEMO_RAW_DIR.glob("100*.jpg"))[:8]
    for p in photos[:5]:
        shutil.copy2(p, raw / p.name)
    config = write_config(tmp_path, raw)
    assert materialize_data(config).success
    out = tmp_path / "out" / "casual_shoes"
    captions = (out / "captions.json").read_bytes()

    for p in photos[5:]:  # new photos: new captions to write
        shutil.copy2(p, raw / p.name)
    real = fsutil.fsync_file
    monkeypatch.setattr(fsutil, "fsync_file", lambda p: enospc() if "captions.json" in p.name else real(p))
    result = dg.materialize(
        category_assets("casual_shoes", ["raw_images", "cleaned_images", "captions"]),
        resources={"pipeline_config": PipelineConfigResource(config_path=str(config))},
        raise_on_error=False,
    )
    (failure,) = result.get_step_failure_events()
    error = failure.step_failure_data.error
    message = error.cause.message if error.cause else error.message
    assert "DiskFullError" in (error.cause.cls_name if error.cause else error.cls_name)
    assert f"the disk is full writing in {out} (" in message and " free)" in message
    assert (out / "captions.json").read_bytes() == captions
    assert leftovers(out) == []

    monkeypatch.undo()  # space freed: the next run completes
    assert materialize_data(config).success
    assert (out / "captions.json").read_bytes() != captions
