"""Core of the ``cleaned_images`` stage: decode, validate and normalise raw photos.

Every kept photo becomes a ``resolution``-square RGB PNG on white; every rejected file gets a reason
code and a human-readable reason in the discard report. Work is cached by (source sha256, params key)
so a re-run only decodes new or changed files. The raw folder is only ever opened for reading.

Outputs under ``out_dir``::

    images/<name>.png       kept photos (name = raw stem; clashes get ``_<sha256[:8]>``)
    manifest.json           one record per kept photo, sorted by image_file
    discard_report.csv/json one row per rejected raw file
    .clean_cache.json       incremental cache (entries by content+params, outputs the cleaner wrote)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

try:  # colour management is optional in custom Pillow builds; without it ICC profiles are ignored
    from PIL import ImageCms
except ImportError:  # pragma: no cover
    ImageCms = None

from shoe_lora_pipeline.core.fsutil import atomic_write_text

from .config import CleaningConfig
from .imagehash import near_duplicate_pairs, phash_hex
from .manifest import file_sha256

# Bump when the algorithm changes the output pixels or decisions: it invalidates every cache entry.
CLEANER_VERSION = 1
CACHE_VERSION = 1

IMAGES_DIRNAME = "images"
MANIFEST_FILE = "manifest.json"
DISCARD_CSV = "discard_report.csv"
DISCARD_JSON = "discard_report.json"
CACHE_FILE = ".clean_cache.json"
STAGING_DIRNAME = ".clean_staging"

REASON_CODES = (
    "empty_file",
    "not_an_image",
    "truncated_or_corrupt",
    "decompression_bomb",
    "too_small",
    "extreme_aspect",
    "exact_duplicate",
    "unsupported_mode",
    "read_error",
)
DISCARD_COLUMNS = ["source", "sha256", "reason_code", "reason", "duplicate_of"]
RESIZE_POLICIES = ("pad", "crop")
WHITE = (255, 255, 255)
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_REQUIRED_COLUMNS = ("rel_path", "path", "size_bytes", "sha256", "format", "kind")


# --------------------------------------------------------------------------------------------------
# Parameters and per-file outcome


@dataclass(frozen=True)
class CleaningParams:
    """Everything that changes output pixels or keep/reject decisions (and hence the cache key)."""

    resolution: int = 512
    min_side: int = 128
    max_aspect_ratio: float = 4.0
    max_image_pixels: int = 50_000_000
    resize_policy: str = "pad"

    def __post_init__(self) -> None:
        if self.resize_policy not in RESIZE_POLICIES:
            raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {self.resize_policy!r}")
        if self.resolution < 1 or self.min_side < 1 or self.max_image_pixels < 1:
            raise ValueError(f"resolution, min_side and max_image_pixels must be >= 1: {self}")
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"max_aspect_ratio must be >= 1.0, got {self.max_aspect_ratio}")

    def key(self) -> str:
        """Short stable hash of the params plus the cleaner version (part of every cache key)."""
        payload = {"cleaner_version": CLEANER_VERSION, **asdict(self)}
        payload["max_aspect_ratio"] = float(payload["max_aspect_ratio"])
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_config(cls, cleaning: CleaningConfig, resolution: int) -> CleaningParams:
        return cls(
            resolution=int(resolution),
            min_side=cleaning.min_side,
            max_aspect_ratio=float(cleaning.max_aspect_ratio),
            max_image_pixels=cleaning.max_image_pixels,
            resize_policy=cleaning.resize_policy,
        )


@dataclass
class CleanOutcome:
    """Result of :func:`clean_one`: a normalised RGB image, or a reject code + reason.

    ``reason`` describes the problem and its value but not the path (callers prefix the file name).
    ``original_size`` is (width, height) after EXIF transpose, when the header could be read.
    """

    image: Image.Image | None = None
    reason_code: str | None = None
    reason: str | None = None
    original_size: tuple[int, int] | None = None
    original_mode: str | None = None
    decoded_format: str | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None


class ImageRejected(Exception):
    """Raised inside the cleaning helpers (e.g. :func:`to_rgb`); ``code`` is one of REASON_CODES."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Decoding one file


@contextmanager
def _pillow_guards(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb check as a backstop, truncation as an error; globals restored afterwards.

    Our own, configurable check runs right after the lazy ``Image.open`` (see :func:`_open_image`).
    Pillow's check (also in ``Image.open``) reads the global ``Image.MAX_IMAGE_PIXELS`` and only
    *warns* between 1x and 2x of it, so the warning is turned into an error here, and the limit is
    raised temporarily when the configured one is higher (otherwise Pillow would refuse images the
    config allows).
    """
    old_max, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels if old_max is None else max(max_pixels, old_max)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old_max
        ImageFile.LOAD_TRUNCATED_IMAGES = old_truncated


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff_signature(head: bytes) -> str | None:
    """Name of the image format whose magic bytes start ``head`` (None if none matches)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    """Reason text for Pillow's own bomb check, in the same words as ours where possible."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match:
        declared = int(match.group(1))
        return f"image declares {declared:,} pixels > max_image_pixels {max_pixels:,} (possible decompression bomb)"
    return f"refused as a possible decompression bomb (max_image_pixels {max_pixels:,}): {exc}"


def _open_image(f: BinaryIO, max_pixels: int) -> Image.Image:
    """Lazy open (header only) plus the pixel-count check, before any pixel buffer is allocated."""
    try:
        img = Image.open(f)
    except UnidentifiedImageError:
        f.seek(0)
        head = f.read(16)
        kind = _sniff_signature(head)
        if kind:  # right magic bytes, unparseable header: a damaged image rather than a non-image
            raise ImageRejected(
                "truncated_or_corrupt", f"{kind} signature but the header is corrupt"
            ) from None
        raise ImageRejected(
            "not_an_image", f"not a recognised image format (starts with {head[:8]!r})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", _bomb_reason(exc, max_pixels)) from None
    except Exception as exc:  # Pillow raises many types (SyntaxError, struct.error, ...) on bad headers
        raise ImageRejected(
            "truncated_or_corrupt", f"unreadable image header ({type(exc).__name__}: {exc})"
        ) from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageRejected(
            "decompression_bomb",
            f"image declares {w}×{h} = {w * h:,} pixels > max_image_pixels {max_pixels:,} "
            "(possible decompression bomb)",
        )
    return img


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed (after EXIF orientation), from header data only.

    ``img.getexif()`` is avoided on purpose: for PNG it decodes the whole image to look for a late
    eXIf chunk. The size checks are symmetric anyway; this only makes reject messages match the photo.
    """
    w, h = img.size
    raw_exif = img.info.get("exif")
    if not raw_exif:
        return w, h
    try:
        exif = Image.Exif()
        exif.load(raw_exif)
        orientation = exif.get(0x0112)
    except Exception:  # corrupt EXIF must not reject an otherwise fine photo
        return w, h
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def _check_geometry(size: tuple[int, int], params: CleaningParams) -> None:
    w, h = size
    short, long = min(w, h), max(w, h)
    if short < params.min_side:
        raise ImageRejected(
            "too_small", f"image is {w}×{h}, shorter side {short} < min_side {params.min_side}"
        )
    ratio = long / short
    if ratio > params.max_aspect_ratio:
        raise ImageRejected(
            "extreme_aspect",
            f"image is {w}×{h}, aspect ratio {ratio:.2f} > max_aspect_ratio {params.max_aspect_ratio:g}",
        )


def _load_pixels(img: Image.Image) -> None:
    """Decode the (first) frame; truncation and corrupt streams surface here."""
    try:
        img.seek(0)  # animated GIF/WebP/APNG: the first frame only
        img.load()
    except MemoryError:
        raise  # a machine problem, not a property of the file: do not silently drop the photo
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(
            "decompression_bomb", f"refused as a possible decompression bomb: {exc}"
        ) from None
    except Exception as exc:
        raise ImageRejected("truncated_or_corrupt", f"image data is truncated or corrupt ({exc})") from None


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF: keep the stored orientation rather than losing the photo
        return img.copy()


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """I;16* / I / F -> L (or LA with tRNS) with proper scaling; Pillow's convert() would clip."""
    arr = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        # Float images are either 0..1 (normalised) or 0..255; anything else is clipped.
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        out = np.clip(values * scale, 0, 255)
    else:
        # 16-bit data (I;16 and Pillow's 32-bit "I", which is how 16-bit PNG/TIFF often arrive):
        # 65535 / 257 = 255 maps the full range exactly.
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    gray = Image.fromarray(np.rint(out).astype(np.uint8))
    transparency = img.info.get("transparency")
    if isinstance(transparency, int) and img.mode != "F":
        alpha = Image.fromarray(np.where(arr == transparency, 0, 255).astype(np.uint8))
        return Image.merge("LA", (gray, alpha))
    return gray


def _to_srgb(img: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (Adobe RGB, CMYK press profiles...) so colours match sRGB."""
    icc = img.info.get("icc_profile")
    if not icc or ImageCms is None or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(img, src, dst, outputMode=out_mode)
    except Exception:  # broken/unsupported profile: fall back to Pillow's plain conversion
        return img
    return converted if converted is not None else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto WHITE (product-photo background)."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_8bit(img)
    img = _to_srgb(img)
    try:
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")  # also expands P/L/RGB + tRNS transparency into alpha
            background = Image.new("RGBA", rgba.size, (*WHITE, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageRejected("unsupported_mode", f"cannot convert mode {img.mode} to RGB ({exc})") from None


def fit_square(img: Image.Image, resolution: int, policy: str) -> Image.Image:
    """Resize to ``resolution`` x ``resolution``.

    pad: longer side -> resolution, centred on white (nothing of the shoe is lost).
    crop: shorter side -> resolution, centre crop (fills the frame, may cut toe/heel).
    """
    w, h = img.size
    if policy == "pad":
        scale = resolution / max(w, h)
        size = (max(1, min(resolution, round(w * scale))), max(1, min(resolution, round(h * scale))))
    elif policy == "crop":
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    else:
        raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    # reducing_gap: integer box-reduce first for big downscales (fast, visually identical to LANCZOS).
    resized = img if size == (w, h) else img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if policy == "pad":
        canvas = Image.new("RGB", (resolution, resolution), WHITE)
        canvas.paste(resized, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
        return canvas
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    out = resized.crop((left, top, left + resolution, top + resolution))
    out.info = {}  # no metadata (EXIF, ICC, dpi) from the raw file leaks into the output
    return out


def clean_one(path: Path, params: CleaningParams) -> CleanOutcome:
    """Decode, validate and normalise one file (pure: reads ``path`` only, writes nothing)."""
    outcome = CleanOutcome()
    try:
        outcome.image = _clean(Path(path), params, outcome)
    except ImageRejected as rej:
        outcome.image, outcome.reason_code, outcome.reason = None, rej.code, rej.reason
    return outcome


def _clean(path: Path, params: CleaningParams, outcome: CleanOutcome) -> Image.Image:
    try:
        if path.stat().st_size == 0:
            raise ImageRejected("empty_file", "file is empty (0 bytes)")
        f = open(path, "rb")  # noqa: SIM115 - closed by the with-block below (read-only, never written)
    except OSError as exc:
        raise ImageRejected("read_error", f"cannot read file ({exc.strerror or exc})") from None
    with f, _pillow_guards(params.max_image_pixels):
        img = _open_image(f, params.max_image_pixels)
        with img:
            outcome.original_mode, outcome.decoded_format = img.mode, img.format
            outcome.original_size = _oriented_size(img)
            _check_geometry(outcome.original_size, params)  # header only: rejects cost no decode
            _load_pixels(img)
            upright = _exif_transpose(img)
    outcome.original_size = upright.size
    return fit_square(to_rgb(upright), params.resolution, params.resize_policy)


# --------------------------------------------------------------------------------------------------
# Batch cleaning with cache


@dataclass
class CleaningReport:
    raw_count: int  # image candidates in the manifest
    valid_count: int  # kept images written to images/
    valid_ratio: float
    rejects: list[dict]  # rows of the discard report
    rejects_by_reason: dict[str, int]
    near_duplicates: list[dict]  # {"first", "second", "distance"}: image_file names, first is earlier
    processed_count: int  # files decoded this run (cache misses)
    reused_count: int  # files whose outcome came from the cache
    removed_count: int  # stale outputs deleted from images/
    total_output_bytes: int
    seconds: float
    out_dir: Path | None = None
    records: list[dict] = field(default_factory=list)  # the manifest.json content

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
            "near_duplicate_pairs": len(self.near_duplicates),
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


@dataclass(frozen=True)
class _Job:
    path: str
    sha256: str
    params: CleaningParams
    staging_file: str


def _run_job(job: _Job) -> dict:
    """Worker body (top level so it pickles): verify content, clean, hash, write the staged PNG."""
    try:
        actual = file_sha256(job.path)
    except OSError as exc:
        return {"status": "rejected", "reason_code": "read_error", "reason": f"cannot read file ({exc})"}
    if actual != job.sha256:
        # The cache is keyed by the manifest's hash, so never store pixels of different content.
        return {
            "status": "rejected",
            "reason_code": "read_error",
            "reason": f"file changed since the raw scan (sha256 {actual[:12]}… != {job.sha256[:12]}…); "
            "re-run the raw scan",
        }
    outcome = clean_one(Path(job.path), job.params)
    base = {
        "original_size": list(outcome.original_size) if outcome.original_size else None,
        "original_mode": outcome.original_mode,
        "decoded_format": outcome.decoded_format,
    }
    if not outcome.ok:
        return {"status": "rejected", "reason_code": outcome.reason_code, "reason": outcome.reason, **base}
    save_png(outcome.image, Path(job.staging_file))
    return {"status": "kept", "phash": phash_hex(outcome.image), **base}


def save_png(img: Image.Image, path: Path) -> None:
    """Deterministic PNG: fixed compression, no text/time chunks, no metadata carried over."""
    img.info = {}
    img.save(path, format="PNG", compress_level=6, optimize=False)


def _effective_workers(workers: int, n_jobs: int) -> int:
    wanted = workers if workers > 0 else (os.cpu_count() or 1)
    return max(1, min(wanted, n_jobs))


def _map_jobs(jobs: list[_Job], workers: int, progress: Callable[[int, int], None] | None) -> list[dict]:
    """Run jobs in order; results are in job order whatever the worker count (determinism)."""
    results: list[dict] = []

    def collect(result: dict) -> None:
        results.append(result)
        if progress is not None:
            progress(len(results), len(jobs))

    n = _effective_workers(workers, len(jobs))
    if n > 1:
        # spawn: safe inside threaded hosts (Dagster) and identical on Linux and macOS.
        ctx = multiprocessing.get_context("spawn")
        chunksize = max(1, min(32, len(jobs) // (n * 4)))
        try:
            with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
                for result in pool.map(_run_job, jobs, chunksize=chunksize):
                    collect(result)
        except BrokenProcessPool as exc:
            # e.g. a worker killed by the OOM killer, or a __main__ that spawn cannot re-import
            # (code piped on stdin). Jobs are idempotent: finish the rest in this process.
            warnings.warn(
                f"cleaning worker pool failed ({exc}); continuing in-process", RuntimeWarning, stacklevel=3
            )
    for job in jobs[len(results) :]:
        collect(_run_job(job))
    return results


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
) -> tuple[list[dict], dict[str, str]]:
    """All pairs within ``max_distance`` and, for each later image, its nearest earlier neighbour."""
    pairs: list[dict] = []
    nearest: dict[int, tuple[int, int]] = {}  # j -> (distance, i)
    for i, j, dist in near_duplicate_pairs(phashes, max_distance):
        pairs.append(
            {"first": names[kept[i].entry_key], "second": names[kept[j].entry_key], "distance": dist}
        )
        nearest[j] = min(nearest.get(j, (dist, i)), (dist, i))
    of = {names[kept[j].entry_key]: names[kept[i].entry_key] for j, (_, i) in nearest.items()}
    return pairs, of


def _write_discard_reports(out_dir: Path, rejects: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=DISCARD_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rejects:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in DISCARD_COLUMNS})
    atomic_write_text(out_dir / DISCARD_CSV, buf.getvalue())
    atomic_write_text(out_dir / DISCARD_JSON, json.dumps(rejects, indent=2, ensure_ascii=False) + "\n")


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
    images_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
    staging.mkdir()

    rows = _image_rows(manifest)
    params_key = params.key()
    candidates, rejects = _split_candidates(rows, params_key)
    cache = _load_cache(out_dir / CACHE_FILE)
    old_outputs: dict[str, dict] = cache["outputs"]

    # An output is reusable only if the file the cache remembers is still there, untouched
    # (same size and mtime; this also catches a run killed between placing files and saving the cache).
    file_of_key = {
        rec.get("key"): name for name, rec in old_outputs.items() if _unchanged(images_dir / name, rec)
    }
    results: dict[str, dict] = {}
    reused_in: dict[str, str] = {}
    jobs: list[_Job] = []
    job_keys: list[str] = []
    for c in candidates:
        entry = cache["entries"].get(c.entry_key)
        if entry and (entry["status"] == "rejected" or c.entry_key in file_of_key):
            results[c.entry_key] = entry
            if entry["status"] == "kept":
                reused_in[c.entry_key] = file_of_key[c.entry_key]
        else:
            jobs.append(_Job(c.path, c.sha256, params, str(staging / f"{c.sha256}.png")))
            job_keys.append(c.entry_key)
    results.update(zip(job_keys, _map_jobs(jobs, workers, progress), strict=True))

    kept = [c for c in candidates if results[c.entry_key]["status"] == "kept"]
    names = _assign_names(kept)
    keys_to_sha = {c.entry_key: c.sha256 for c in candidates}
    removed = _place_outputs(images_dir, staging, old_outputs, names, reused_in, keys_to_sha)
    shutil.rmtree(staging, ignore_errors=True)

    for c in candidates:
        res = results[c.entry_key]
        if res["status"] == "rejected":
            rejects.append(_reject_row(c.rel_path, c.sha256, res["reason_code"], res["reason"]))
    rejects.sort(key=lambda r: r["source"])

    phashes = [results[c.entry_key]["phash"] for c in kept]
    pairs, near_of = _near_duplicates(kept, names, phashes, near_duplicate_distance)
    records = []
    outputs: dict[str, dict] = {}
    for c in kept:
        res, name = results[c.entry_key], names[c.entry_key]
        size, mtime_ns = _fingerprint(images_dir / name)
        outputs[name] = {"key": c.entry_key, "bytes": size, "mtime_ns": mtime_ns}
        records.append(
            {
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
            }
        )
    records.sort(key=lambda r: r["image_file"])

    # Cache only outcomes of this manifest (bounded size); read errors may be transient: never cached.
    entries = {
        c.entry_key: results[c.entry_key]
        for c in candidates
        if results[c.entry_key].get("reason_code") != "read_error"
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    _write_discard_reports(out_dir, rejects)
    cache_doc = {"version": CACHE_VERSION, "params_key": params_key, "entries": entries, "outputs": outputs}
    atomic_write_text(out_dir / CACHE_FILE, json.dumps(cache_doc, indent=1, sort_keys=True) + "\n")

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
    )
