"""Decode, validate and normalise one raw photo: the per-file half of the ``cleaned_images`` stage.

Pure functions of a file's bytes and :class:`CleaningParams` (nothing here writes outside the staging
file it is given), so they run in worker processes; this module imports only Pillow and numpy for the
same reason (a worker starts fast). :func:`clean_file` is the worker body: it checks the file still has
the hash the raw scan recorded, decodes it once, and from the in-memory result writes the PNG and
computes everything later stages need from the pixels (perceptual hash, colour estimate).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

try:  # colour management is optional in custom Pillow builds; without it ICC profiles are ignored
    from PIL import ImageCms
except ImportError:  # pragma: no cover
    ImageCms = None

from .colour import estimate_colour
from .fsutil import file_sha256
from .imagehash import phash_hex

if TYPE_CHECKING:
    from .config import CleaningConfig

# Bump when the algorithm changes the output pixels or decisions: it invalidates every cache entry.
CLEANER_VERSION = 2

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
RESIZE_POLICIES = ("pad", "crop")
WHITE = (255, 255, 255)
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_ORIENTATION_METHODS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPPING_METHODS = frozenset(_ORIENTATION_METHODS[o] for o in _TRANSPOSED_ORIENTATIONS)
# zlib settings of the cleaned PNGs (lossless whatever they are). The RLE strategy suits product photos
# (long runs of white, smooth shading after PNG's row filters): as small as the default level 6 and about
# twice as fast, so the level hardly matters (benchmarks/RESULTS.md has the numbers).
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_TYPE = zlib.Z_RLE

Box = tuple[float, float, float, float]


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
    """Any Pillow mode -> RGB; transparency is composited onto WHITE (product-photo background).

    A plain RGB image is returned as it is (no copy).
    """
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_8bit(img)
    img = _to_srgb(img)
    try:
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")  # also expands P/L/RGB + tRNS transparency into alpha
            background = Image.new("RGBA", rgba.size, (*WHITE, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as exc:
        raise ImageRejected("unsupported_mode", f"cannot convert mode {img.mode} to RGB ({exc})") from None


def target_size(size: tuple[float, float], resolution: int, policy: str) -> tuple[int, int]:
    """(width, height) an image of ``size`` is resized to before padding (pad) or cropping (crop)."""
    w, h = size
    if policy == "pad":
        scale = resolution / max(w, h)
        return max(1, min(resolution, round(w * scale))), max(1, min(resolution, round(h * scale)))
    if policy == "crop":
        scale = resolution / min(w, h)
        return max(resolution, round(w * scale)), max(resolution, round(h * scale))
    raise ValueError(f"resize_policy must be one of {RESIZE_POLICIES}, got {policy!r}")


def crop_top_left(resized_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(top, left) of the centre crop that ``crop`` takes from an image resized to ``resized_size``."""
    return (resized_size[1] - resolution) // 2, (resized_size[0] - resolution) // 2


def crop_offset(original_size: tuple[int, int], resolution: int, policy: str) -> tuple[int, int]:
    """(top, left) of the cleaned square within the resized photo, from the photo's original (width,
    height): (0, 0) for ``pad`` (nothing is cut), the centre crop's offset for ``crop``. SDXL's size
    conditioning (``crops_coords_top_left``) takes it."""
    if policy == "pad":
        return 0, 0
    return crop_top_left(target_size(original_size, resolution, policy), resolution)


def fit_square(img: Image.Image, resolution: int, policy: str, box: Box | None = None) -> Image.Image:
    """Resize to ``resolution`` x ``resolution``.

    pad: longer side -> resolution, centred on white (nothing of the shoe is lost).
    crop: shorter side -> resolution, centre crop (fills the frame, may cut toe/heel).
    ``box``: the region of ``img`` that holds the photo (a JPEG decoded at a reduced DCT scale has a
    fraction of a pixel more, see :func:`_decode_upright`); default the whole image.
    """
    full: Box = (0, 0, img.width, img.height)
    box = full if box is None else box
    size = target_size((box[2] - box[0], box[3] - box[1]), resolution, policy)
    # reducing_gap: integer box-reduce first for big downscales (fast, visually identical to LANCZOS).
    if size == img.size and box == full:
        resized = img
    else:
        resized = img.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    if policy == "pad":
        canvas = Image.new("RGB", (resolution, resolution), WHITE)
        canvas.paste(resized, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
        return canvas
    top, left = crop_top_left(size, resolution)
    out = resized.crop((left, top, left + resolution, top + resolution))
    out.info = {}  # no metadata (EXIF, ICC, dpi) from the raw file leaks into the output
    return out


def _orientation_method(img: Image.Image) -> Image.Transpose | None:
    """The transpose that shows a loaded image upright (EXIF Orientation, read as Pillow's
    ``ImageOps.exif_transpose`` reads it); None when upright already or the EXIF is unreadable."""
    try:
        return _ORIENTATION_METHODS.get(img.getexif().get(0x0112, 1))
    except Exception:  # corrupt EXIF: keep the stored orientation rather than losing the photo
        return None


def _transpose_box(box: Box, size: tuple[int, int], method: Image.Transpose) -> Box:
    """Where ``box`` (inside an image of ``size``) lies after ``method`` transposes the image."""
    w, h = size
    T = Image.Transpose
    point = {
        T.FLIP_LEFT_RIGHT: lambda x, y: (w - x, y),
        T.FLIP_TOP_BOTTOM: lambda x, y: (x, h - y),
        T.ROTATE_180: lambda x, y: (w - x, h - y),
        T.TRANSPOSE: lambda x, y: (y, x),
        T.ROTATE_90: lambda x, y: (y, w - x),  # counter-clockwise
        T.ROTATE_270: lambda x, y: (h - y, x),  # clockwise
        T.TRANSVERSE: lambda x, y: (h - y, w - x),
    }[method]
    (ax, ay), (bx, by) = point(box[0], box[1]), point(box[2], box[3])
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _decode_upright(
    img: Image.Image, params: CleaningParams, outcome: CleanOutcome
) -> tuple[Image.Image, Box]:
    """Check the header, decode once and turn the pixels upright; (image, box of the photo in it).

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still has at least the output's
    pixels (``Image.draft``): most of the decode and resize cost of a big photo goes away, and the
    LANCZOS resize that follows sees the same photo. The request is a square of the output's longer
    side, which is right whichever way EXIF turns the photo.
    """
    outcome.original_mode, outcome.decoded_format = img.mode, img.format
    outcome.original_size = _oriented_size(img)
    _check_geometry(outcome.original_size, params)  # header only: rejects cost no decode
    stored = img.size
    side = max(target_size(outcome.original_size, params.resolution, params.resize_policy))
    drafted = img.draft(None, (side, side))
    _load_pixels(img)
    box: Box = drafted[1] if drafted else (0, 0, img.width, img.height)
    method = _orientation_method(img)
    if method is None:
        outcome.original_size = stored
        return img, box
    outcome.original_size = (stored[1], stored[0]) if method in _SWAPPING_METHODS else stored
    return img.transpose(method), _transpose_box(box, img.size, method)


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
        with img:  # closing drops the pixels: everything that needs them happens inside
            upright, box = _decode_upright(img, params, outcome)
            return fit_square(to_rgb(upright), params.resolution, params.resize_policy, box=box)


# --------------------------------------------------------------------------------------------------
# The worker body


@dataclass(frozen=True)
class CleanJob:
    path: str
    sha256: str
    params: CleaningParams
    staging_file: str


def clean_file(job: CleanJob) -> dict[str, Any]:
    """Worker body (top level so it pickles): verify the content, clean it, write the staged PNG.

    From the image already in memory it also computes what later stages need from the pixels: the
    perceptual hash (near-duplicates) and the colour estimate (captions), so no stage decodes again.
    """
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
    if outcome.image is None:
        return {"status": "rejected", "reason_code": outcome.reason_code, "reason": outcome.reason, **base}
    save_png(outcome.image, Path(job.staging_file))
    colour, details = estimate_colour(outcome.image)
    return {
        "status": "kept",
        "phash": phash_hex(outcome.image),
        "colour_estimate": {"colour": colour, "details": details},
        **base,
    }


def save_png(img: Image.Image, path: Path) -> None:
    """Deterministic, lossless PNG: fixed compression, no text/time chunks, no metadata carried over."""
    img.info = {}
    img.save(
        path, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_COMPRESS_TYPE, optimize=False
    )
