"""Dataset splits stage core: deterministic train/val/test folders from captioned, cleaned images.

An image's split is a pure function of its raw content hash (``metadata.source_sha256``) and the
fractions, so adding or removing other images never moves it, and identical photos (same hash)
always share a split. Near-duplicates the cleaning stage linked (``metadata.near_duplicate_of``)
follow the image they duplicate, so a near-copy cannot leak into val/test.

Layout written (and nothing else touched)::

    out_dir/{train,val,test}/images/<image_file>   hard link to the cleaned PNG (copy if impossible)
    out_dir/{train,val,test}/captions.json          the recipe's captions.json format

This module imports no Dagster; the asset wraps it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .captions import (
    CaptionsFormatError,
    read_captions_json,
    validate_caption_entries,
    write_captions_json,
)
from .config import SplitConfig
from .fsutil import disk_full_guard, file_sha256
from .layout import SPLITS

SPLIT_SALT = "split-v1"  # changing it reshuffles every image: only on purpose
_TMP_PREFIX = ".tmp-split-"

Fractions = SplitConfig | Sequence[float] | Mapping[str, float]


def _fractions(fractions: Fractions) -> tuple[float, float, float]:
    if isinstance(fractions, SplitConfig):
        values = (fractions.train, fractions.val, fractions.test)
    elif isinstance(fractions, Mapping):
        values = tuple(float(fractions[k]) for k in SPLITS)
    else:
        values = tuple(float(v) for v in fractions)
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions (train, val, test) must be >= 0 and sum to 1, got {values}")
    return values  # type: ignore[return-value]


def split_position(content_hash: str) -> float:
    """Uniform position in [0, 1) derived from the content hash (salted so it is not the hash prefix)."""
    if not isinstance(content_hash, str) or not content_hash.strip():
        raise ValueError(f"content hash must be a non-empty string, got {content_hash!r}")
    digest = hashlib.sha256((content_hash.strip().lower() + SPLIT_SALT).encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def assign_split(content_hash: str, fractions: Fractions) -> str:
    """Split name ("train", "val" or "test") from the content hash alone: stable as the set grows."""
    fr = _fractions(fractions)
    u = split_position(content_hash)
    cumulative = 0.0
    for name, frac in zip(SPLITS, fr, strict=True):
        cumulative += frac
        if frac > 0 and u < cumulative:
            return name
    # Float rounding can leave u just above the total: give it to the last split that takes images.
    return next(name for name, frac in zip(reversed(SPLITS), reversed(fr), strict=True) if frac > 0)


@dataclass
class SplitsResult:
    counts: dict[str, int]
    files: dict[str, list[str]]
    assignments: dict[str, str]
    linked: int = 0
    copied: int = 0
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    near_duplicates_grouped: int = 0  # entries whose split follows the image they near-duplicate


def _split_key(entry: dict[str, Any], by_ref: dict[str, dict[str, Any]], cleaned_images_dir: Path) -> str:
    """Content hash that decides this entry's split; near-duplicates use their original's."""
    seen: set[int] = set()
    current = entry
    while True:
        seen.add(id(current))
        ref = current["metadata"].get("near_duplicate_of")
        target = by_ref.get(str(ref)) if ref is not None else None
        if target is None or id(target) in seen:
            break
        current = target
    sha = current["metadata"].get("source_sha256")
    if isinstance(sha, str) and sha.strip():
        return sha
    # No raw hash recorded: the cleaned file's bytes are still a stable content key.
    return file_sha256(cleaned_images_dir / current["image_file"])


def _split_dir(out_dir: Path, split: str) -> Path:
    # Refuse symlinked split folders: following one would write or delete outside out_dir.
    d = out_dir / split
    for p in (d, d / "images"):
        if p.is_symlink():
            raise RuntimeError(f"{p} is a symlink; refusing to write through it")
    (d / "images").mkdir(parents=True, exist_ok=True)
    return d


def _place(src: Path, dest: Path) -> str:
    """Make ``dest`` hold ``src``'s content: 'unchanged', 'linked' or 'copied'. Never a symlink."""
    if dest.exists() and not dest.is_symlink():
        if os.path.samefile(src, dest):
            return "unchanged"
        s, d = src.stat(), dest.stat()
        # copy2 keeps mtime, so size+mtime equal means this is our earlier copy of the same file.
        if s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns:
            return "unchanged"
    tmp = dest.with_name(f"{_TMP_PREFIX}{dest.name}")
    if os.path.lexists(tmp):
        tmp.unlink()
    try:
        os.link(src, tmp)
        how = "linked"
    except OSError:  # other filesystem, or links unsupported/forbidden
        with disk_full_guard(dest.parent):
            try:
                shutil.copy2(src, tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full disk leaves no partial copy
                raise
        how = "copied"
    os.replace(tmp, dest)  # atomic; also replaces a stray symlink rather than writing through it
    return how


def make_splits(
    captions_entries: list[dict[str, Any]],
    cleaned_images_dir: Path,
    out_dir: Path,
    fractions: Fractions,
    group_near_duplicates: bool = True,
) -> SplitsResult:
    """Write ``out_dir/{train,val,test}/images`` and ``captions.json`` so each holds exactly its images.

    Incremental: files already in place are kept, new ones hard-linked (copied if linking fails),
    PNGs (and our own temp files) in a split's ``images/`` that are not assigned to it are removed.
    Other entries there are left alone and reported. An empty train split with >= 1 image is a
    warning, not a reason to move images: moving by set size would break split stability.

    ``group_near_duplicates``: an entry whose ``metadata.near_duplicate_of`` names another entry
    (image_file, id or source) takes that entry's split. Its only effect on stability: an existing
    image moves if a newly added photo becomes the original it near-duplicates (kept together on
    purpose, so no near-copy straddles train and val/test).
    """
    cleaned_images_dir = Path(cleaned_images_dir)
    out_dir = Path(out_dir)
    fr = _fractions(fractions)
    validate_caption_entries(captions_entries, "captions entries")
    by_ref: dict[str, dict[str, Any]] = {}
    for e in captions_entries if group_near_duplicates else []:
        meta = e["metadata"]
        for key in (e["image_file"], meta.get("id"), meta.get("source")):
            if isinstance(key, str) and key:
                by_ref.setdefault(key, e)

    result = SplitsResult(counts=dict.fromkeys(SPLITS, 0), files={s: [] for s in SPLITS}, assignments={})
    per_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for e in sorted(captions_entries, key=lambda e: e["image_file"]):
        src = cleaned_images_dir / e["image_file"]
        if not src.is_file():
            raise FileNotFoundError(f"cleaned image {src} (captioned as {e['image_file']!r}) is missing")
        meta = e["metadata"]
        ref = meta.get("near_duplicate_of")
        if ref is not None and str(ref) in by_ref:
            result.near_duplicates_grouped += 1
        if not (isinstance(meta.get("source_sha256"), str) and meta["source_sha256"].strip()):
            result.warnings.append(f"{e['image_file']}: no source_sha256; split keyed on the cleaned file")
        split = assign_split(_split_key(e, by_ref, cleaned_images_dir), fr)
        result.assignments[e["image_file"]] = split
        per_split[split].append(e)

    for split in SPLITS:
        d = _split_dir(out_dir, split)
        images = d / "images"
        wanted = {e["image_file"] for e in per_split[split]}
        for e in per_split[split]:
            how = _place(cleaned_images_dir / e["image_file"], images / e["image_file"])
            setattr(result, how, getattr(result, how) + 1)
        write_captions_json(per_split[split], d / "captions.json")
        for p in sorted(images.iterdir()):
            if p.name in wanted:
                continue
            if p.name.startswith(_TMP_PREFIX) or (
                p.suffix.lower() == ".png" and (p.is_symlink() or p.is_file())
            ):
                p.unlink()  # unlink never follows a symlink
                result.removed.append(f"{split}/images/{p.name}")
            else:
                result.warnings.append(f"{split}/images/{p.name}: unexpected entry left in place")
        result.files[split] = sorted(wanted)
        result.counts[split] = len(wanted)

    total = len(captions_entries)
    if total and result.counts["train"] == 0:
        result.warnings.append(
            f"train split is empty: the {total} image(s) all hashed into val/test; add images "
            "(assignments stay stable) or raise the train fraction"
        )
    for split, frac in zip(SPLITS[1:], fr[1:], strict=True):
        if total >= 20 and frac > 0 and result.counts[split] == 0:
            result.warnings.append(f"{split} split is empty although its fraction is {frac:g}")
    return result


def find_overlaps(out_dir: Path) -> list[dict[str, Any]]:
    """Images present in more than one split folder: ``[{"image_file", "splits": [...]}]``."""
    where: dict[str, list[str]] = {}
    for split in SPLITS:
        images = Path(out_dir) / split / "images"
        if images.is_dir():
            for p in images.iterdir():
                if p.suffix.lower() == ".png":
                    where.setdefault(p.name, []).append(split)
    return [{"image_file": name, "splits": s} for name, s in sorted(where.items()) if len(s) > 1]


def missing_or_extra_captions(out_dir: Path, split: str) -> list[dict[str, Any]]:
    """Mismatches between ``split/images/*.png`` and ``split/captions.json`` (empty list = exact)."""
    d = Path(out_dir) / split
    images = d / "images"
    names = {p.name for p in images.iterdir() if p.suffix.lower() == ".png"} if images.is_dir() else set()
    try:
        entries = read_captions_json(d / "captions.json")
    except FileNotFoundError:
        return [{"image_file": None, "problem": f"{d / 'captions.json'} missing"}]
    except CaptionsFormatError as exc:
        return [{"image_file": None, "problem": str(exc)}]
    captioned = {e["image_file"] for e in entries}
    out = [{"image_file": n, "problem": "image without caption"} for n in sorted(names - captioned)]
    out += [{"image_file": n, "problem": "caption without image"} for n in sorted(captioned - names)]
    return out


__all__ = [
    "SPLITS",
    "SplitsResult",
    "assign_split",
    "find_overlaps",
    "make_splits",
    "missing_or_extra_captions",
    "split_position",
]
