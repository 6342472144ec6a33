"""raw_images core: read-only recursive inventory of the raw photo folder."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from shoe_lora_pipeline.core.manifest import (
    MANIFEST_COLUMNS,
    classify,
    file_sha256,
    manifest_hash,
    scan_raw_dir,
)


def _png(path: Path, colour: tuple[int, int, int] = (200, 10, 10), size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """rel path -> (sha256, mtime_ns) for every file (links not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = (file_sha256(p), p.stat().st_mtime_ns)
    return out


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    _png(root / "10001.png")
    _png(root / "sub" / "10002.JPG", colour=(0, 0, 200))
    (root / "sub" / "10002.txt").write_text("a black casual shoe")
    (root / "styles.csv").write_text("id,baseColour\n10001,Black\n")
    (root / "notes.md").write_text("# notes\n")
    (root / "fake.png").write_text("this is not a png")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    git = root / ".git"
    git.mkdir()
    for i in range(5):
        (git / f"obj{i}").write_text("x")
    return root


def test_scan_kinds_columns_and_order(raw: Path) -> None:
    scan = scan_raw_dir(raw)
    df = scan.manifest
    assert list(df.columns) == MANIFEST_COLUMNS
    assert list(df["rel_path"]) == sorted(df["rel_path"])
    kinds = dict(zip(df["rel_path"], df["kind"], strict=True))
    assert kinds == {
        "10001.png": "image",
        "fake.png": "image",  # a text file named .png is still a candidate; the cleaner rejects it
        "notes.md": "metadata",
        "styles.csv": "metadata",
        "sub/10002.JPG": "image",
        "sub/10002.txt": "caption",
    }
    row = df.set_index("rel_path").loc["sub/10002.JPG"]
    assert row["format"] == "jpg"
    assert Path(row["path"]).is_absolute() and Path(row["path"]) == (raw / "sub" / "10002.JPG").absolute()
    assert row["size_bytes"] == (raw / "sub" / "10002.JPG").stat().st_size
    assert row["sha256"] == hashlib.sha256((raw / "sub" / "10002.JPG").read_bytes()).hexdigest()
    assert str(df["size_bytes"].dtype) == "int64"
    assert scan.counts_by_kind() == {"caption": 1, "image": 3, "metadata": 2}


def test_hidden_entries_skipped_with_reason_and_not_descended(raw: Path) -> None:
    skipped = {s["path"]: s["reason"] for s in scan_raw_dir(raw).skipped}
    assert skipped == {".DS_Store": "hidden file", ".git": "hidden directory"}


def test_scan_never_writes_to_raw_dir(raw: Path) -> None:
    before = _snapshot(raw)
    entries_before = sorted(p.name for p in raw.rglob("*"))
    scan_raw_dir(raw)
    assert _snapshot(raw) == before
    assert sorted(p.name for p in raw.rglob("*")) == entries_before


def test_symlink_outside_raw_dir_is_skipped_naming_target(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _png(root / "a.png")
    secret = _png(tmp_path / "outside" / "secret.png")
    (root / "link.png").symlink_to(secret)
    (root / "linkdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    scan = scan_raw_dir(root)
    assert list(scan.manifest["rel_path"]) == ["a.png"]
    reasons = {s["path"]: s["reason"] for s in scan.skipped}
    assert str(secret) in reasons["link.png"] and "outside raw_dir" in reasons["link.png"]
    assert "outside raw_dir" in reasons["linkdir"]


def test_symlinks_inside_followed_once_without_loops(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _png(root / "real" / "a.png")
    (root / "alias.png").symlink_to(root / "real" / "a.png")  # file link inside: followed
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # loop back to the root
    (root / "again").symlink_to(root / "real", target_is_directory=True)  # alias of a real folder
    (root / "broken.png").symlink_to(root / "missing.png")
    scan = scan_raw_dir(root)
    assert list(scan.manifest["rel_path"]) == ["alias.png", "real/a.png"]
    shas = set(scan.manifest["sha256"])
    assert len(shas) == 1  # same content: the cleaner reports the alias as an exact duplicate
    reasons = {s["path"]: s["reason"] for s in scan.skipped}
    assert "already scanned" in reasons["again"]
    assert "already scanned" in reasons["real/loop"]
    assert "broken symlink" in reasons["broken.png"]


def test_linked_folder_inside_raw_dir_is_scanned(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _png(root / ".store" / "x.png")  # hidden folder, reachable only through the link
    (root / "visible").symlink_to(root / ".store", target_is_directory=True)
    scan = scan_raw_dir(root)
    assert list(scan.manifest["rel_path"]) == ["visible/x.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_skipped_not_opened(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _png(root / "a.png")
    os.mkfifo(root / "pipe.png")  # opening it would block the scan forever
    scan = scan_raw_dir(root)
    assert list(scan.manifest["rel_path"]) == ["a.png"]
    assert scan.skipped == [{"path": "pipe.png", "reason": "not a regular file"}]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _png(root / "a.png")
    locked = _png(root / "locked.png")
    locked.chmod(0)
    try:
        scan = scan_raw_dir(root)
    finally:
        locked.chmod(0o644)
    assert list(scan.manifest["rel_path"]) == ["a.png"]
    assert scan.skipped[0]["path"] == "locked.png" and "unreadable" in scan.skipped[0]["reason"]


def test_missing_or_non_folder_raw_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        scan_raw_dir(missing)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=str(a_file)):
        scan_raw_dir(a_file)


def test_empty_folder_gives_empty_manifest(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    scan = scan_raw_dir(tmp_path / "raw")
    assert scan.manifest.empty and list(scan.manifest.columns) == MANIFEST_COLUMNS
    assert scan.skipped == []
    assert len(manifest_hash(scan.manifest)) == 64


def test_manifest_hash_stable_across_locations_and_mtimes(raw: Path, tmp_path: Path) -> None:
    h1 = manifest_hash(scan_raw_dir(raw).manifest)
    copy = tmp_path / "elsewhere" / "raw"
    shutil.copytree(raw, copy)  # new absolute paths and mtimes
    os.utime(copy / "10001.png", (1, 1))
    df2 = scan_raw_dir(copy).manifest
    assert manifest_hash(df2) == h1
    assert manifest_hash(df2.iloc[::-1]) == h1  # row order does not matter
    (copy / "10001.png").rename(copy / "renamed.png")
    assert manifest_hash(scan_raw_dir(copy).manifest) != h1
    _png(copy / "renamed.png", colour=(1, 2, 3))
    assert manifest_hash(scan_raw_dir(copy).manifest) != h1


def test_file_sha256_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # spans several 1 MiB chunks
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.JPEG", ("jpeg", "image")),
        ("a.webp", ("webp", "image")),
        ("README", ("", "image")),
        ("a.TXT", ("txt", "caption")),
        ("meta.yml", ("yml", "metadata")),
        ("meta.json", ("json", "metadata")),
    ],
)
def test_classify(name: str, expected: tuple[str, str]) -> None:
    assert classify(name) == expected
