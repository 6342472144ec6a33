"""Core of the ``cleaned_images`` stage: decode, validate and normalise raw photos, incrementally.

Every kept photo becomes a ``resolution``-square RGB PNG on white; every rejected file gets a reason
code and a human-readable reason in the discard report. The per-file work (:mod:`.normalise`) runs in
the process pool of :mod:`.pool`; it is cached by (source sha256, params key) so a re-run only decodes
new or changed files. The raw folder is only ever opened for reading.

Outputs under ``out_dir``::

    images/<name>.png       kept photos (name = raw stem; clashes get ``_<sha256[:8]>``)
    manifest.json           one record per kept photo, sorted by image_file (with its pHash and the
                            colour estimate captions use, both computed while the photo was in memory)
    discard_report.csv/json one row per rejected raw file
    .clean_cache.json       incremental cache (entries by content+params, outputs the cleaner wrote)
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from shoe_lora_pipeline.core.fsutil import atomic_write_json, atomic_write_text, disk_full_guard

from .imagehash import iter_near_duplicate_pairs
from .normalise import (  # noqa: F401  (re-exported: the stage's public API)
    CLEANER_VERSION,
    REASON_CODES,
    RESIZE_POLICIES,
    WHITE,
    CleaningParams,
    CleanJob,
    CleanOutcome,
    ImageRejected,
    clean_file,
    clean_one,
    fit_square,
    save_png,
    target_size,
    to_rgb,
)
from .pool import map_in_workers

CACHE_VERSION = 1

IMAGES_DIRNAME = "images"
MANIFEST_FILE = "manifest.json"
DISCARD_CSV = "discard_report.csv"
DISCARD_JSON = "discard_report.json"
CACHE_FILE = ".clean_cache.json"
STAGING_DIRNAME = ".clean_staging"
DISCARD_COLUMNS = ["source", "sha256", "reason_code", "reason", "duplicate_of"]
_REQUIRED_COLUMNS = ("rel_path", "path", "size_bytes", "sha256", "format", "kind")
# A catalogue of side views on white has many look-alike pairs: count them all, list the first ones.
MAX_LISTED_NEAR_DUPLICATES = 1000


# --------------------------------------------------------------------------------------------------
# Batch cleaning with cache


@dataclass
class CleaningReport:
    raw_count: int  # image candidates in the manifest
    valid_count: int  # kept images written to images/
    valid_ratio: float
    rejects: list[dict]  # rows of the discard report
    rejects_by_reason: dict[str, int]
    near_duplicates: list[dict]  # {"first", "second", "distance"}: image_file names, first is earlier;
    # the first MAX_LISTED_NEAR_DUPLICATES pairs (by the later image), near_duplicate_count counts all
    processed_count: int  # files decoded this run (cache misses)
    reused_count: int  # files whose outcome came from the cache
    removed_count: int  # stale outputs deleted from images/
    total_output_bytes: int
    seconds: float
    out_dir: Path | None = None
    records: list[dict] = field(default_factory=list)  # the manifest.json content
    near_duplicate_count: int = 0

    def to_dataframe(self) -> pd.DataFrame:
        """Rejects as a DataFrame (columns :data:`DISCARD_COLUMNS`, also when empty)."""
        return pd.DataFrame(self.rejects, columns=DISCARD_COLUMNS)

    def summary(self) -> dict[str, Any]:
        """Scalar fields, e.g. for Dagster materialisation metadata."""
        return {
            "raw_count": self.raw_count,
            "valid_count": self.valid_count,
            "valid_ratio": self.valid_ratio,
            "rejected_count": len(self.rejects),
            "rejects_by_reason": dict(self.rejects_by_reason),
            "near_duplicate_pairs": self.near_duplicate_count,
            "processed_count": self.processed_count,
            "reused_count": self.reused_count,
            "removed_count": self.removed_count,
            "total_output_bytes": self.total_output_bytes,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class _Candidate:
    rel_path: str
    path: str
    sha256: str
    format: str
    entry_key: str  # "<sha256>:<params key>"

    @property
    def stem(self) -> str:
        return PurePosixPath(self.rel_path).stem


def _fingerprint(path: Path) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of a file, (None, None) if it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _unchanged(path: Path, rec: dict) -> bool:
    """True if ``path`` exists and still has the size/mtime recorded when the cleaner wrote it."""
    size, mtime_ns = _fingerprint(path)
    return size is not None and (size, mtime_ns) == (rec.get("bytes"), rec.get("mtime_ns"))


def _load_cache(path: Path) -> dict:
    empty = {"version": CACHE_VERSION, "entries": {}, "outputs": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty  # missing or unreadable cache: just recompute
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return empty
    return {
        "version": CACHE_VERSION,
        "entries": dict(data.get("entries") or {}),
        "outputs": dict(data.get("outputs") or {}),
    }


def _image_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in _REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}; expected {list(_REQUIRED_COLUMNS)}")
    rows = manifest[manifest["kind"] == "image"]
    return rows.sort_values("rel_path", kind="stable").reset_index(drop=True)


def _reject_row(rel: str, sha: str, code: str, reason: str, duplicate_of: str | None = None) -> dict:
    return {
        "source": rel,
        "sha256": sha,
        "reason_code": code,
        "reason": f"{rel}: {reason}",
        "duplicate_of": duplicate_of,
    }


def _split_candidates(rows: pd.DataFrame, params_key: str) -> tuple[list[_Candidate], list[dict]]:
    """Empty files and exact duplicates are decided from the manifest alone (no decode)."""
    candidates: list[_Candidate] = []
    rejects: list[dict] = []
    first_by_sha: dict[str, str] = {}
    for row in rows.itertuples(index=False):
        rel, sha = str(row.rel_path), str(row.sha256)
        if int(row.size_bytes) == 0:
            rejects.append(_reject_row(rel, sha, "empty_file", "file is empty (0 bytes)"))
        elif sha in first_by_sha:
            first = first_by_sha[sha]
            rejects.append(
                _reject_row(rel, sha, "exact_duplicate", f"identical bytes to {first}", duplicate_of=first)
            )
        else:
            first_by_sha[sha] = rel
            fmt = "" if pd.isna(row.format) else str(row.format)  # "" reads back from CSV as NaN
            candidates.append(_Candidate(rel, str(row.path), sha, fmt, f"{sha}:{params_key}"))
    return candidates, rejects


def _assign_names(kept: list[_Candidate]) -> dict[str, str]:
    """entry_key -> output file name; later stem clashes (rel_path order) get a content suffix.

    Clashes are checked case-insensitively so outputs also stay distinct on macOS/Windows disks.
    """
    taken: set[str] = set()
    names: dict[str, str] = {}
    for c in kept:
        for stem in (c.stem, f"{c.stem}_{c.sha256[:8]}", f"{c.stem}_{c.sha256}"):
            name = f"{stem}.png"
            if name.casefold() not in taken:
                break
        taken.add(name.casefold())
        names[c.entry_key] = name
    return names


def _place_outputs(
    images_dir: Path,
    staging: Path,
    old_outputs: dict[str, dict],
    names: dict[str, str],
    reused_in: dict[str, str],
    keys_to_sha: dict[str, str],
) -> int:
    """Make images/ hold exactly ``names`` (entry_key -> file); returns how many old outputs went away.

    Reused files that must change name go through staging first so renames can never clobber each
    other; only files recorded in ``old_outputs`` (written by the cleaner) are ever deleted.
    """
    in_place = {key for key, old in reused_in.items() if names.get(key) == old}
    for key, old in reused_in.items():
        if key in names and key not in in_place:
            os.replace(images_dir / old, staging / f"{keys_to_sha[key]}.png")
    wanted_names = set(names.values())
    removed = 0
    for name, rec in old_outputs.items():
        if rec.get("key") in in_place and names.get(rec["key"]) == name:
            continue
        target = images_dir / name
        if target.is_file():
            target.unlink()
            removed += name not in wanted_names
    for key, name in names.items():
        if key not in in_place:
            os.replace(staging / f"{keys_to_sha[key]}.png", images_dir / name)
    return removed


def _near_duplicates(
    kept: list[_Candidate], names: dict[str, str], phashes: list[str], max_distance: int
) -> tuple[list[dict], int, dict[str, str]]:
    """(listed pairs, number of pairs, image -> its nearest earlier neighbour) within ``max_distance``."""
    pairs: list[dict] = []
    count = 0
    nearest: dict[int, tuple[int, int]] = {}  # j -> (distance, i)
    for i, j, dist in iter_near_duplicate_pairs(phashes, max_distance):
        count += 1
        if len(pairs) < MAX_LISTED_NEAR_DUPLICATES:
            pairs.append(
                {"first": names[kept[i].entry_key], "second": names[kept[j].entry_key], "distance": dist}
            )
        nearest[j] = min(nearest.get(j, (dist, i)), (dist, i))
    of = {names[kept[j].entry_key]: names[kept[i].entry_key] for j, (_, i) in nearest.items()}
    return pairs, count, of


def _write_discard_reports(out_dir: Path, rejects: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=DISCARD_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rejects:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in DISCARD_COLUMNS})
    atomic_write_text(out_dir / DISCARD_CSV, buf.getvalue())
    atomic_write_json(out_dir / DISCARD_JSON, rejects, indent=2, ensure_ascii=False)


def _plan(
    candidates: list[_Candidate], cache: dict, images_dir: Path, staging: Path, params: CleaningParams
) -> tuple[dict[str, dict], dict[str, str], list[CleanJob], list[str]]:
    """(cached results, reusable outputs by entry key, jobs to run, their entry keys)."""
    # An output is reusable only if the file the cache remembers is still there, untouched
    # (same size and mtime; this also catches a run killed between placing files and saving the cache).
    file_of_key = {
        rec.get("key"): name for name, rec in cache["outputs"].items() if _unchanged(images_dir / name, rec)
    }
    results: dict[str, dict] = {}
    reused_in: dict[str, str] = {}
    jobs: list[CleanJob] = []
    job_keys: list[str] = []
    for c in candidates:
        entry = cache["entries"].get(c.entry_key)
        if entry and (entry["status"] == "rejected" or c.entry_key in file_of_key):
            results[c.entry_key] = entry
            if entry["status"] == "kept":
                reused_in[c.entry_key] = file_of_key[c.entry_key]
        else:
            jobs.append(CleanJob(c.path, c.sha256, params, str(staging / f"{c.sha256}.png")))
            job_keys.append(c.entry_key)
    return results, reused_in, jobs, job_keys


def _manifest_records(
    kept: list[_Candidate], results: dict[str, dict], names: dict[str, str], near_of: dict[str, str]
) -> Iterator[dict[str, Any]]:
    for c in kept:
        res, name = results[c.entry_key], names[c.entry_key]
        yield {
            "image_file": name,
            "id": c.stem,
            "source": c.rel_path,
            "source_sha256": c.sha256,
            "original_size": res["original_size"],
            "original_mode": res["original_mode"],
            "format": c.format,
            "decoded_format": res.get("decoded_format"),
            "phash": res["phash"],
            "near_duplicate_of": near_of.get(name),
            "colour_estimate": res["colour_estimate"],
        }


def _save(out_dir: Path, records: list[dict], rejects: list[dict], cache_doc: dict) -> None:
    atomic_write_json(out_dir / MANIFEST_FILE, records, indent=2, ensure_ascii=False)
    _write_discard_reports(out_dir, rejects)
    atomic_write_json(out_dir / CACHE_FILE, cache_doc, indent=1, sort_keys=True)


def clean_images(
    manifest: pd.DataFrame,
    out_dir: Path,
    params: CleaningParams,
    near_duplicate_distance: int = 4,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> CleaningReport:
    """Clean every ``kind == "image"`` row of a raw manifest into ``out_dir`` (incremental).

    ``workers``: 0 = one process per CPU core, 1 = in this process. ``progress(done, total)`` is
    called after each decoded file (e.g. to log from Dagster).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    images_dir, staging = out_dir / IMAGES_DIRNAME, out_dir / STAGING_DIRNAME
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run

    rows = _image_rows(manifest)
    params_key = params.key()
    candidates, rejects = _split_candidates(rows, params_key)
    cache = _load_cache(out_dir / CACHE_FILE)
    # A full disk while the workers write staged PNGs: the staging folder goes, the published images and
    # the cache stay as the last complete run left them.
    with disk_full_guard(out_dir):
        try:
            images_dir.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            results, reused_in, jobs, job_keys = _plan(candidates, cache, images_dir, staging, params)
            results.update(zip(job_keys, map_in_workers(clean_file, jobs, workers, progress), strict=True))
            kept = [c for c in candidates if results[c.entry_key]["status"] == "kept"]
            names = _assign_names(kept)
            keys_to_sha = {c.entry_key: c.sha256 for c in candidates}
            removed = _place_outputs(images_dir, staging, cache["outputs"], names, reused_in, keys_to_sha)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    for c in candidates:
        res = results[c.entry_key]
        if res["status"] == "rejected":
            rejects.append(_reject_row(c.rel_path, c.sha256, res["reason_code"], res["reason"]))
    rejects.sort(key=lambda r: r["source"])

    phashes = [results[c.entry_key]["phash"] for c in kept]
    pairs, pair_count, near_of = _near_duplicates(kept, names, phashes, near_duplicate_distance)
    records = sorted(_manifest_records(kept, results, names, near_of), key=lambda r: r["image_file"])
    outputs: dict[str, dict] = {}
    for c in kept:
        size, mtime_ns = _fingerprint(images_dir / names[c.entry_key])
        outputs[names[c.entry_key]] = {"key": c.entry_key, "bytes": size, "mtime_ns": mtime_ns}
    # Cache only outcomes of this manifest (bounded size); read errors may be transient: never cached.
    entries = {
        c.entry_key: results[c.entry_key]
        for c in candidates
        if results[c.entry_key].get("reason_code") != "read_error"
    }
    cache_doc = {"version": CACHE_VERSION, "params_key": params_key, "entries": entries, "outputs": outputs}
    _save(out_dir, records, rejects, cache_doc)

    raw_count = len(rows)
    return CleaningReport(
        raw_count=raw_count,
        valid_count=len(kept),
        valid_ratio=(len(kept) / raw_count) if raw_count else 0.0,
        rejects=rejects,
        rejects_by_reason=dict(sorted(Counter(r["reason_code"] for r in rejects).items())),
        near_duplicates=pairs,
        processed_count=len(jobs),
        reused_count=len(candidates) - len(jobs),
        removed_count=removed,
        total_output_bytes=sum(o["bytes"] for o in outputs.values()),
        seconds=round(time.perf_counter() - start, 3),
        out_dir=out_dir,
        records=records,
        near_duplicate_count=pair_count,
    )
