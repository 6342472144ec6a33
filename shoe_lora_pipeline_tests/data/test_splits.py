"""Splits core: hash-stable assignment, exact split folders, incremental re-runs."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from shoe_lora_pipeline.core.captions import read_captions_json
from shoe_lora_pipeline.core.config import SplitConfig
from shoe_lora_pipeline.core.splits import (
    SPLITS,
    assign_split,
    find_overlaps,
    make_splits,
    missing_or_extra_captions,
)


def fake_hash(i: int) -> str:
    return hashlib.sha256(f"photo-{i}".encode()).hexdigest()


def make_entries(tmp_path: Path, n: int, start: int = 0) -> tuple[list[dict], Path]:
    """n cleaned PNGs (tiny, distinct colours) and their caption entries."""
    images = tmp_path / "cleaned" / "images"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(start, start + n):
        name = f"{i:05d}.png"
        Image.new("RGB", (8, 8), (i % 256, (i * 7) % 256, 200)).save(images / name)
        entries.append(
            {
                "image_file": name,
                "caption": f"A professional product photo of shoe {i}",
                "metadata": {"original_size": [600, 800], "processed": True, "source_sha256": fake_hash(i)},
            }
        )
    return entries, images


def split_files(out: Path, split: str) -> set[str]:
    return {p.name for p in (out / split / "images").iterdir()}


def test_assignment_is_stable_when_images_are_added() -> None:
    fr = SplitConfig(train=0.8, val=0.1, test=0.1)
    first = {fake_hash(i): assign_split(fake_hash(i), fr) for i in range(200)}
    grown = {fake_hash(i): assign_split(fake_hash(i), fr) for i in range(300)}
    assert all(grown[h] == s for h, s in first.items())
    # Same answer for every accepted fractions shape.
    assert all(assign_split(h, (0.8, 0.1, 0.1)) == s for h, s in first.items())
    assert all(assign_split(h, {"train": 0.8, "val": 0.1, "test": 0.1}) == s for h, s in first.items())


def test_fractions_roughly_honoured() -> None:
    counts = Counter(assign_split(fake_hash(i), (0.7, 0.2, 0.1)) for i in range(1000))
    assert abs(counts["train"] - 700) < 60
    assert abs(counts["val"] - 200) < 45
    assert abs(counts["test"] - 100) < 35


def test_zero_fraction_split_gets_nothing_and_bad_fractions_refused() -> None:
    assert {assign_split(fake_hash(i), (0.5, 0.5, 0.0)) for i in range(300)} == {"train", "val"}
    assert {assign_split(fake_hash(i), (1.0, 0.0, 0.0)) for i in range(50)} == {"train"}
    with pytest.raises(ValueError):
        assign_split(fake_hash(0), (0.5, 0.2, 0.2))
    with pytest.raises(ValueError):
        assign_split("", (0.8, 0.1, 0.1))


def test_make_splits_exact_folders_no_overlap(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 60)
    out = tmp_path / "splits"
    res = make_splits(entries, images, out, SplitConfig())
    assert sum(res.counts.values()) == 60 and res.counts["train"] > 0
    assert res.linked + res.copied == 60 and res.removed == []
    assert find_overlaps(out) == []
    for split in SPLITS:
        assert split_files(out, split) == set(res.files[split])
        assert missing_or_extra_captions(out, split) == []
        assert [e["image_file"] for e in read_captions_json(out / split / "captions.json")] == res.files[
            split
        ]
        for name in res.files[split]:
            p = out / split / "images" / name
            assert not p.is_symlink() and p.read_bytes() == (images / name).read_bytes()
    assert {n: s for s in SPLITS for n in res.files[s]} == res.assignments


def test_rerun_is_incremental_and_removes_stale_images(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 40)
    out = tmp_path / "splits"
    # Something that is not ours, beside the split folders: must survive.
    (out).mkdir()
    keep = out / "README.txt"
    keep.write_text("not ours")
    first = make_splits(entries, images, out, SplitConfig())
    again = make_splits(entries, images, out, SplitConfig())
    assert again.unchanged == 40 and again.linked == again.copied == 0 and again.removed == []

    gone = entries.pop(5)
    where = first.assignments[gone["image_file"]]
    res = make_splits(entries, images, out, SplitConfig())
    assert res.removed == [f"{where}/images/{gone['image_file']}"]
    assert gone["image_file"] not in split_files(out, where)
    assert all(res.assignments[e["image_file"]] == first.assignments[e["image_file"]] for e in entries)
    assert missing_or_extra_captions(out, where) == []
    assert keep.read_text() == "not ours"
    assert (images / gone["image_file"]).is_file()  # the cleaned source is never touched


def test_adding_images_moves_none_on_disk(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 30)
    out = tmp_path / "splits"
    first = make_splits(entries, images, out, SplitConfig())
    more, _ = make_entries(tmp_path, 20, start=30)
    res = make_splits(entries + more, images, out, SplitConfig())
    assert res.removed == [] and res.unchanged == 30
    assert all(res.assignments[k] == v for k, v in first.assignments.items())


def test_changed_fractions_move_images_without_overlap(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 30)
    out = tmp_path / "splits"
    make_splits(entries, images, out, (0.5, 0.25, 0.25))
    res = make_splits(entries, images, out, (1.0, 0.0, 0.0))
    assert res.counts == {"train": 30, "val": 0, "test": 0}
    assert find_overlaps(out) == []
    assert split_files(out, "val") == set() and read_captions_json(out / "val" / "captions.json") == []


def test_tiny_dataset_empty_train_is_a_warning(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 200)
    # Pick one image that hashes into val: a one-image dataset of it leaves train empty.
    val_entry = next(
        e for e in entries if assign_split(e["metadata"]["source_sha256"], SplitConfig()) == "val"
    )
    res = make_splits([val_entry], images, tmp_path / "splits", SplitConfig())
    assert res.counts == {"train": 0, "val": 1, "test": 0}
    assert any("train split is empty" in w for w in res.warnings)


def test_near_duplicates_share_their_originals_split(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 40)
    original = entries[0]
    for e in entries[1:]:
        e["metadata"]["near_duplicate_of"] = original["image_file"]
    res = make_splits(entries, images, tmp_path / "splits", SplitConfig())
    assert set(res.assignments.values()) == {res.assignments[original["image_file"]]}
    assert res.near_duplicates_grouped == 39
    alone = make_splits(entries, images, tmp_path / "splits2", SplitConfig(), group_near_duplicates=False)
    assert len(set(alone.assignments.values())) > 1 and alone.near_duplicates_grouped == 0


def test_copy_fallback_when_hard_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries, images = make_entries(tmp_path, 10)
    out = tmp_path / "splits"

    def no_link(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    res = make_splits(entries, images, out, SplitConfig())
    assert res.copied == 10 and res.linked == 0
    for split in SPLITS:
        for name in res.files[split]:
            p = out / split / "images" / name
            assert p.stat().st_ino != (images / name).stat().st_ino
            assert p.read_bytes() == (images / name).read_bytes()
    again = make_splits(entries, images, out, SplitConfig())
    assert again.unchanged == 10 and again.copied == 0
    # A re-cleaned image (new content, new mtime) is copied again.
    name = entries[0]["image_file"]
    Image.new("RGB", (8, 8), (1, 2, 3)).save(images / name)
    os.utime(images / name, ns=(1, 1))
    third = make_splits(entries, images, out, SplitConfig())
    assert third.copied == 1
    assert (out / third.assignments[name] / "images" / name).read_bytes() == (images / name).read_bytes()


def test_hard_links_used_when_possible(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 5)
    out = tmp_path / "splits"
    res = make_splits(entries, images, out, SplitConfig())
    assert res.linked == 5
    name = entries[0]["image_file"]
    assert os.path.samefile(out / res.assignments[name] / "images" / name, images / name)


def test_symlinked_split_folder_is_refused(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 3)
    out = tmp_path / "splits"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "train")
    with pytest.raises(RuntimeError, match="symlink"):
        make_splits(entries, images, out, SplitConfig())
    assert list(elsewhere.iterdir()) == []


def test_check_helpers_detect_problems(tmp_path: Path) -> None:
    entries, images = make_entries(tmp_path, 20)
    out = tmp_path / "splits"
    res = make_splits(entries, images, out, (0.5, 0.5, 0.0))
    a = res.files["train"][0]
    (out / "val" / "images" / a).write_bytes((images / a).read_bytes())  # planted overlap
    assert find_overlaps(out) == [{"image_file": a, "splits": ["train", "val"]}]
    assert missing_or_extra_captions(out, "val") == [{"image_file": a, "problem": "image without caption"}]
    (out / "train" / "images" / a).unlink()
    assert missing_or_extra_captions(out, "train") == [{"image_file": a, "problem": "caption without image"}]
    (out / "test" / "captions.json").write_text(json.dumps({"not": "a list"}))
    assert "expected a list" in missing_or_extra_captions(out, "test")[0]["problem"]
