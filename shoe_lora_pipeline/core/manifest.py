"""Core of the ``raw_images`` stage: a read-only inventory of the raw photo folder.

Every file is hashed (sha256, streamed) so later stages can cache by content and detect exact
duplicates; nothing is ever written into ``raw_dir``. Deciding whether a file really is an image is
left to the cleaner: every regular file that is not a caption or metadata file is an image
*candidate* (a text file named ``.png`` is a candidate that cleaning rejects as ``not_an_image``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from shoe_lora_pipeline.core.fsutil import file_sha256  # noqa: F401  (part of this module's API)

# Suffixes we expect for photos. Informational only: kind "image" is "anything not caption/metadata".
IMAGE_SUFFIXES = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
CAPTION_SUFFIXES = frozenset({"txt"})
METADATA_SUFFIXES = frozenset({"csv", "tsv", "json", "jsonl", "md", "yaml", "yml", "toml"})
# OS junk that is not hidden by a leading dot but is never a photo.
SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})

MANIFEST_COLUMNS = ["rel_path", "path", "size_bytes", "sha256", "format", "kind"]


@dataclass
class RawScan:
    """Result of :func:`scan_raw_dir`.

    ``manifest``: one row per file considered, sorted by ``rel_path``, columns :data:`MANIFEST_COLUMNS`.
    ``skipped``: ``{"path": rel_path, "reason": text}`` for everything left out (hidden, system,
    symlink outside raw_dir, loops, unreadable, not a regular file).
    """

    manifest: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)

    def counts_by_kind(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.manifest["kind"].value_counts().sort_index().items()}


def classify(name: str) -> tuple[str, str]:
    """(format, kind) for a file name: format is the lower-case suffix without the dot."""
    fmt = Path(name).suffix.lower().lstrip(".")
    if fmt in CAPTION_SUFFIXES:
        return fmt, "caption"
    if fmt in METADATA_SUFFIXES:
        return fmt, "metadata"
    return fmt, "image"


def _skip_reason_for_name(name: str, is_dir: bool) -> str | None:
    if name.startswith("."):
        return "hidden directory" if is_dir else "hidden file"
    if name.lower() in SYSTEM_NAMES:
        return "operating-system file/folder, not a photo"
    return None


def _inside(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def _empty_manifest() -> pd.DataFrame:
    df = pd.DataFrame(
        {c: pd.Series(dtype="int64" if c == "size_bytes" else "object") for c in MANIFEST_COLUMNS}
    )
    return df


def scan_raw_dir(raw_dir: Path) -> RawScan:
    """Recursively inventory ``raw_dir`` (read-only). Raises FileNotFoundError if it is missing."""
    raw_dir = Path(raw_dir).expanduser()
    if not raw_dir.exists():
        raise FileNotFoundError(f"raw image folder does not exist: {raw_dir}")
    if not raw_dir.is_dir():
        raise NotADirectoryError(f"raw image path is not a folder: {raw_dir}")
    root_abs = raw_dir.absolute()
    root_real = raw_dir.resolve()

    rows: list[dict] = []
    skipped: list[dict] = []
    visited_dirs: set[Path] = {root_real}  # real paths already walked: every folder is walked once
    stack: list[tuple[Path, str]] = [(root_abs, "")]  # (absolute dir as found, rel prefix)
    linked_dirs: list[tuple[str, Path]] = []  # symlinked folders, walked after all real ones
    while stack or linked_dirs:
        if not stack:
            # Real folders win over aliases: a symlink to a folder that was walked anyway is skipped.
            linked_dirs.sort(key=lambda item: item[0])
            rel, link_path = linked_dirs.pop(0)
            real = Path(os.path.realpath(link_path))
            if real in visited_dirs:
                skipped.append({"path": rel, "reason": f"symlink to folder {real}, already scanned"})
                continue
            visited_dirs.add(real)
            stack.append((link_path, rel + "/"))
        directory, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(
                {"path": prefix.rstrip("/") or ".", "reason": f"unreadable folder: {exc.strerror or exc}"}
            )
            continue
        subdirs: list[tuple[Path, str]] = []
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            item = _scan_entry(entry, rel, root_real, skipped)
            if isinstance(item, dict):
                rows.append(item)
            elif item == "dir":
                real = Path(os.path.realpath(entry.path))
                if real not in visited_dirs:  # e.g. a bind mount seen twice
                    visited_dirs.add(real)
                    subdirs.append((Path(entry.path), rel + "/"))
            elif item == "linked_dir":
                linked_dirs.append((rel, Path(entry.path)))
        stack.extend(reversed(subdirs))

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS) if rows else _empty_manifest()
    manifest = manifest.sort_values("rel_path", kind="stable").reset_index(drop=True)
    manifest["size_bytes"] = manifest["size_bytes"].astype("int64")
    skipped.sort(key=lambda s: s["path"])
    return RawScan(manifest=manifest, skipped=skipped)


def _scan_entry(entry: os.DirEntry, rel: str, root_real: Path, skipped: list[dict]) -> dict | str | None:
    """A manifest row, "dir" / "linked_dir" for a folder to walk, or None (skipped, reason recorded)."""
    try:
        is_link = entry.is_symlink()
        is_dir = entry.is_dir()  # follows symlinks
    except OSError as exc:
        skipped.append({"path": rel, "reason": f"unreadable: {exc.strerror or exc}"})
        return None
    reason = _skip_reason_for_name(entry.name, is_dir)
    if reason:
        skipped.append({"path": rel, "reason": reason})
        return None
    if is_link:
        target = Path(os.path.realpath(entry.path))
        if not target.exists():
            skipped.append({"path": rel, "reason": f"broken symlink to {target}"})
            return None
        if not _inside(target, root_real):
            skipped.append(
                {"path": rel, "reason": f"symlink to {target}, which is outside raw_dir {root_real}"}
            )
            return None
    if is_dir:
        return "linked_dir" if is_link else "dir"
    return _file_row(entry, rel, skipped)


def _file_row(entry: os.DirEntry, rel: str, skipped: list[dict]) -> dict | None:
    try:
        st = entry.stat()  # follows symlinks
        if not stat.S_ISREG(st.st_mode):
            # FIFOs/devices: opening a FIFO would block the scan forever.
            skipped.append({"path": rel, "reason": "not a regular file"})
            return None
        digest = file_sha256(entry.path)
    except OSError as exc:
        skipped.append({"path": rel, "reason": f"unreadable: {exc.strerror or exc}"})
        return None
    fmt, kind = classify(entry.name)
    return {
        "rel_path": rel,
        "path": entry.path,
        "size_bytes": int(st.st_size),
        "sha256": digest,
        "format": fmt,
        "kind": kind,
    }


def manifest_hash(manifest: pd.DataFrame) -> str:
    """sha256 over the sorted (rel_path, sha256) pairs: changes only when the raw content changes."""
    h = hashlib.sha256()
    pairs = sorted(zip(manifest["rel_path"].astype(str), manifest["sha256"].astype(str), strict=True))
    for rel, digest in pairs:
        h.update(f"{rel}\t{digest}\n".encode())
    return h.hexdigest()
