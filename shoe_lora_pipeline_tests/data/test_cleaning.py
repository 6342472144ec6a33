"""cleaned_images core: decoding rules, rejects, resize policies, cache, determinism; plus pHash.

Every test image is built here, in tmp_path; resolutions are small (64) except one 512 test.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import shutil
import time
import warnings
import zlib
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageCms, ImageDraw, JpegImagePlugin

from shoe_lora_pipeline.core.cleaning import (
    CACHE_FILE,
    DISCARD_COLUMNS,
    CleaningParams,
    ImageRejected,
    clean_images,
    clean_one,
    fit_square,
    to_rgb,
)
from shoe_lora_pipeline.core.colour import estimate_colour
from shoe_lora_pipeline.core.config import CleaningConfig
from shoe_lora_pipeline.core.imagehash import (
    dct_matrix,
    hamming_distance,
    hamming_to_set,
    hash_to_hex,
    hex_to_hash,
    near_duplicate_pairs,
    pairwise_hamming,
    phash,
    phash_hex,
)
from shoe_lora_pipeline.core.manifest import file_sha256, scan_raw_dir

RES = 64


def _params(**overrides: object) -> CleaningParams:
    base = {"resolution": RES, "min_side": 32, "max_aspect_ratio": 4.0, "max_image_pixels": 50_000_000}
    return CleaningParams(**{**base, **overrides})


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _pattern(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """Blocky random colours: distinct seeds give very different perceptual hashes."""
    cells = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.NEAREST)


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose IHDR claims width x height (CRC recomputed so it parses)."""
    buf = io.BytesIO()
    Image.new("L", (16, 16), 255).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = (zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF).to_bytes(4, "big")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def _ok(path: Path, **overrides: object) -> Image.Image:
    outcome = clean_one(path, _params(**overrides))
    assert outcome.ok, (outcome.reason_code, outcome.reason)
    img = outcome.image
    assert img.mode == "RGB" and img.size == (RES, RES)
    return img


def _rejected(path: Path, code: str, **overrides: object) -> str:
    outcome = clean_one(path, _params(**overrides))
    assert not outcome.ok and outcome.reason_code == code, (outcome.reason_code, outcome.reason)
    return outcome.reason


def _px(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return img.getpixel((x, y))


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b, strict=True))


WHITE, BLACK, RED, BLUE = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 0, 255)
C = RES // 2  # centre pixel coordinate


# --------------------------------------------------------------------------------------------------
# clean_one: decoding and normalisation


def test_exif_orientation_applied_and_size_reported_after_transpose(tmp_path: Path) -> None:
    img = Image.new("RGB", (300, 200), RED)
    img.paste(BLUE, (150, 0, 300, 200))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: left half ends up on top
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    # Reject messages use the displayed size too (header only, no decode).
    assert "image is 200×300" in _rejected(path, "too_small", min_side=250)
    outcome = clean_one(path, _params())
    assert outcome.ok and outcome.original_size == (200, 300)
    out = outcome.image
    assert _close(_px(out, C, 3), RED, 40) and _close(_px(out, C, RES - 4), BLUE, 40)
    assert _px(out, 0, C) == WHITE  # portrait result is padded left/right


def test_rgba_composited_onto_white_not_black(tmp_path: Path) -> None:
    img = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # transparent *black*
    img.paste((0, 0, 0, 255), (50, 50, 150, 150))
    out = _ok(_save(img, tmp_path / "a.png"))
    assert _px(out, 2, 2) == WHITE and _px(out, C, C) == BLACK


def test_la_and_palette_transparency_onto_white(tmp_path: Path) -> None:
    la = Image.new("LA", (200, 200), (0, 0))
    la.paste((0, 255), (50, 50, 150, 150))
    out = _ok(_save(la, tmp_path / "la.png"))
    assert _px(out, 2, 2) == WHITE and _px(out, C, C) == BLACK

    p = Image.new("P", (200, 200), 0)
    p.putpalette([0, 0, 0, 255, 0, 0])
    p.paste(1, (50, 50, 150, 150))
    path = _save(p, tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    assert Image.open(path).info.get("transparency") == 0
    out = _ok(path)
    assert _px(out, 2, 2) == WHITE and _close(_px(out, C, C), RED, 0)


def test_pa_and_unsupported_modes_in_memory() -> None:
    pa = Image.new("PA", (20, 20), (1, 0))
    pa.putpalette([0, 0, 0, 255, 0, 0])
    assert to_rgb(pa).getpixel((0, 0)) == WHITE
    with pytest.raises(ImageRejected) as err:
        to_rgb(Image.new("La", (4, 4)))  # premultiplied LA: Pillow cannot convert it
    assert err.value.code == "unsupported_mode" and "La" in err.value.reason


def test_grey_cmyk_and_bilevel(tmp_path: Path) -> None:
    grey = _ok(_save(Image.new("L", (200, 200), 100), tmp_path / "l.png"))
    assert _px(grey, C, C) == (100, 100, 100)
    cmyk = _ok(_save(Image.new("CMYK", (200, 200), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95))
    assert _close(_px(cmyk, C, C), RED, 40)
    bilevel = Image.new("1", (200, 200), 1)
    bilevel.paste(0, (50, 50, 150, 150))
    out = _ok(_save(bilevel, tmp_path / "b.png"))
    assert _px(out, 2, 2) == WHITE and _px(out, C, C) == BLACK


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((200, 200), 128 * 257, np.uint16)
    arr[:, :100] = 65535
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    out = _ok(path)
    assert _px(out, 1, C) == WHITE and _px(out, RES - 2, C) == (128, 128, 128)


def test_32bit_int_and_float_tiff(tmp_path: Path) -> None:
    i32 = _save(Image.fromarray(np.full((100, 100), 64 * 257, np.int32)), tmp_path / "i.tif")
    assert Image.open(i32).mode == "I"
    assert _px(_ok(i32), C, C) == (64, 64, 64)
    f32 = _save(Image.fromarray(np.full((100, 100), 0.25, np.float32)), tmp_path / "f.tif")
    assert Image.open(f32).mode == "F"
    assert _px(_ok(f32), C, C) == (64, 64, 64)  # 0..1 floats scaled by 255


def test_icc_profile_is_applied_and_not_copied(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = _save(Image.new("RGB", (200, 200), (30, 120, 200)), tmp_path / "icc.png", icc_profile=srgb)
    out = _ok(path)
    assert _close(_px(out, C, C), (30, 120, 200), 3)
    assert "icc_profile" not in out.info


def test_webp_and_animated_first_frame(tmp_path: Path) -> None:
    still = _ok(_save(Image.new("RGB", (200, 150), BLUE), tmp_path / "s.webp", lossless=True))
    assert _px(still, C, C) == BLUE
    frames = [Image.new("RGB", (120, 120), c) for c in (RED, (0, 255, 0), BLUE)]
    for name, kwargs in (("anim.gif", {}), ("anim.webp", {"lossless": True})):
        path = _save(
            frames[0], tmp_path / name, save_all=True, append_images=frames[1:], duration=50, **kwargs
        )
        assert Image.open(path).n_frames == 3
        assert _close(_px(_ok(path), C, C), RED, 8), name


def test_empty_non_image_and_truncated_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "0 bytes" in _rejected(empty, "empty_file")
    fake = tmp_path / "fake.png"
    fake.write_text("definitely not a PNG")
    assert "not a recognised image" in _rejected(fake, "not_an_image")

    buf = io.BytesIO()
    _pattern(1, (200, 200)).save(buf, "JPEG", quality=90)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "truncated" in _rejected(trunc, "truncated_or_corrupt")

    buf = io.BytesIO()
    _pattern(2, (200, 200)).save(buf, "PNG")
    trunc_png = tmp_path / "trunc.png"
    trunc_png.write_bytes(buf.getvalue()[:-200])
    _rejected(trunc_png, "truncated_or_corrupt")

    bad_crc = bytearray(buf.getvalue())
    bad_crc[29] ^= 0xFF  # IHDR CRC
    corrupt = tmp_path / "crc.png"
    corrupt.write_bytes(bytes(bad_crc))
    _rejected(corrupt, "truncated_or_corrupt")
    _rejected(tmp_path / "missing.png", "read_error")


def test_decompression_bomb_refused_before_allocation(tmp_path: Path) -> None:
    bomb = _png_declaring(tmp_path / "bomb.png", 30_000, 30_000)  # 900 MP, 2.7 GB if decoded
    max_pixels_before, filters_before = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    reason = _rejected(bomb, "decompression_bomb")
    assert time.perf_counter() - start < 1.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 200 * 1024, f"peak RSS grew by {grown_kib} KiB"
    assert (
        reason
        == "image declares 900,000,000 pixels > max_image_pixels 50,000,000 (possible decompression bomb)"
    )
    # Globals are only changed for the duration of the decode.
    assert max_pixels_before == Image.MAX_IMAGE_PIXELS and warnings.filters == filters_before

    # Below Pillow's own limit, our configurable limit still applies (checked from the header).
    medium = _png_declaring(tmp_path / "medium.png", 2000, 2000)
    assert "2000×2000 = 4,000,000 pixels > max_image_pixels 1,000,000" in _rejected(
        medium, "decompression_bomb", max_image_pixels=1_000_000
    )
    # With a higher limit it is not a bomb, just a PNG whose data does not match its header.
    _rejected(medium, "truncated_or_corrupt", max_image_pixels=10_000_000)


def test_size_and_aspect_thresholds_configurable(tmp_path: Path) -> None:
    small = _save(_pattern(1, (48, 40)), tmp_path / "small.png")
    reason = _rejected(small, "too_small", min_side=64)
    assert reason == "image is 48×40, shorter side 40 < min_side 64"
    _ok(small, min_side=40)
    wide = _save(_pattern(2, (500, 100)), tmp_path / "wide.png")
    assert "aspect ratio 5.00 > max_aspect_ratio 4" in _rejected(wide, "extreme_aspect")
    _ok(wide, max_aspect_ratio=6.0)


def _wide_with_red_edges() -> Image.Image:
    img = Image.new("RGB", (300, 100), BLACK)
    img.paste(RED, (0, 0, 15, 100))
    img.paste(RED, (285, 0, 300, 100))
    return img


def _has_red(img: Image.Image) -> bool:
    arr = np.asarray(img).astype(int)
    return bool(((arr[..., 0] - arr[..., 1]) > 100).any())


def test_pad_keeps_extremes_crop_removes_them(tmp_path: Path) -> None:
    path = _save(_wide_with_red_edges(), tmp_path / "wide.png")
    pad = _ok(path, resize_policy="pad")
    assert _close(_px(pad, 0, C), RED, 30) and _close(_px(pad, RES - 1, C), RED, 30)
    assert _px(pad, C, 0) == WHITE and _px(pad, C, RES - 1) == WHITE  # letterbox is white
    crop = _ok(path, resize_policy="crop")
    assert not _has_red(crop) and _px(crop, C, 0) == BLACK


def test_fit_square_exact_sizes() -> None:
    for size in ((1, 1), (7, 3), (640, 480), (333, 999)):
        for policy in ("pad", "crop"):
            assert fit_square(Image.new("RGB", size), 50, policy).size == (50, 50)
    with pytest.raises(ValueError, match="resize_policy"):
        fit_square(Image.new("RGB", (5, 5)), 50, "stretch")


def _photo(size: tuple[int, int]) -> Image.Image:
    """Shapes with sharp edges and a thin diagonal line: the worst case for a scaled decode."""
    w, h = size
    img = Image.new("RGB", size, WHITE)
    d = ImageDraw.Draw(img)
    d.ellipse((w * 0.1, h * 0.3, w * 0.7, h * 0.8), fill=(120, 60, 30))
    d.rectangle((w * 0.55, h * 0.1, w * 0.9, h * 0.4), fill=(30, 60, 200))
    d.line((0, 0, w, h), fill=BLACK, width=3)
    return img


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("policy", ["pad", "crop"])
def test_big_jpeg_decoded_at_reduced_scale_matches_full_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, orientation: int, policy: str
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(_photo((1603, 1201)), tmp_path / "big.jpg", quality=92, exif=exif.tobytes())
    decoded: list[tuple[int, int]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None):  # noqa: ANN202
        result = draft(self, mode, size)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = clean_one(path, _params(resize_policy=policy))
    assert decoded == [(201, 151)]  # 1/8 scale: 201 ≥ 64 and 151 ≥ 64
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)
    full = clean_one(path, _params(resize_policy=policy))
    upright = (1201, 1603) if orientation in (6, 8) else (1603, 1201)
    assert fast.original_size == full.original_size == upright
    diff = np.abs(np.asarray(fast.image, np.int16) - np.asarray(full.image, np.int16))
    assert diff.mean() < 0.5 and diff.max() <= 24, (diff.mean(), diff.max())


def test_default_resolution_512(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save(_pattern(5, (300, 200)), raw / "shoe.jpg", quality=90)
    params = CleaningParams.from_config(CleaningConfig(), resolution=512)
    report = clean_images(scan_raw_dir(raw).manifest, tmp_path / "out", params, workers=1)
    assert report.valid_count == 1
    out = Image.open(tmp_path / "out" / "images" / "shoe.png")
    assert out.format == "PNG" and out.mode == "RGB" and out.size == (512, 512)


# --------------------------------------------------------------------------------------------------
# CleaningParams


def test_params_key_and_from_config() -> None:
    cfg = CleaningConfig(min_side=100, max_aspect_ratio=3, max_image_pixels=1000, resize_policy="crop")
    params = CleaningParams.from_config(cfg, 256)
    assert params == CleaningParams(256, 100, 3.0, 1000, "crop")
    keys = {
        params.key(),
        CleaningParams(512, 100, 3.0, 1000, "crop").key(),
        CleaningParams(256, 101, 3.0, 1000, "crop").key(),
        CleaningParams(256, 100, 3.5, 1000, "crop").key(),
        CleaningParams(256, 100, 3.0, 1001, "crop").key(),
        CleaningParams(256, 100, 3.0, 1000, "pad").key(),
    }
    assert len(keys) == 6
    assert params.key() == CleaningParams.from_config(cfg, 256).key()
    with pytest.raises(ValueError, match="resize_policy"):
        CleaningParams(resize_policy="stretch")


# --------------------------------------------------------------------------------------------------
# clean_images: the full stage


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (file_sha256(p), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    """A small raw folder with one example of most outcomes."""
    root = tmp_path / "raw"
    _save(_pattern(1), root / "shoes" / "10001.jpg", quality=92)
    shutil.copyfile(root / "shoes" / "10001.jpg", root / "shoes" / "10001_copy.jpg")  # exact duplicate
    _save(_pattern(2), root / "shoes" / "10002.png")
    _save(_pattern(3), root / "shoes" / "10003.webp", lossless=True)
    _save(_pattern(2), root / "shoes" / "10004.jpg", quality=85)  # near duplicate of 10002
    (root / "shoes" / "10001.txt").write_text("caption")
    (root / "styles.csv").write_text("id\n10001\n")
    (root / "bad").mkdir()
    (root / "bad" / "fake.png").write_text("not an image")
    (root / "bad" / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    _pattern(4).save(buf, "JPEG")
    (root / "bad" / "trunc.jpg").write_bytes(buf.getvalue()[:300])
    _save(_pattern(5, (20, 20)), root / "bad" / "tiny.png")
    _save(_pattern(6, (400, 50)), root / "bad" / "wide.png")
    _png_declaring(root / "bad" / "bomb.png", 30_000, 30_000)
    return root


def test_clean_images_outputs_and_reports(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = clean_images(scan_raw_dir(raw).manifest, out, _params(), near_duplicate_distance=4, workers=1)

    assert report.raw_count == 11 and report.valid_count == 4
    assert report.valid_ratio == pytest.approx(4 / 11)
    assert report.rejects_by_reason == {
        "decompression_bomb": 1,
        "empty_file": 1,
        "exact_duplicate": 1,
        "extreme_aspect": 1,
        "not_an_image": 1,
        "too_small": 1,
        "truncated_or_corrupt": 1,
    }
    assert report.processed_count == 9 and report.reused_count == 0 and report.removed_count == 0

    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == ["10001.png", "10002.png", "10003.png", "10004.png"]
    for name in files:
        with Image.open(out / "images" / name) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (RES, RES)
    assert report.total_output_bytes == sum((out / "images" / f).stat().st_size for f in files)

    records = json.loads((out / "manifest.json").read_text())
    assert records == report.records and [r["image_file"] for r in records] == files
    first = records[0]
    assert first["id"] == "10001" and first["source"] == "shoes/10001.jpg" and first["format"] == "jpg"
    assert first["source_sha256"] == file_sha256(raw / "shoes" / "10001.jpg")
    assert first["original_size"] == [120, 90] and first["original_mode"] == "RGB"
    assert len(first["phash"]) == 16 and int(first["phash"], 16) >= 0
    by_file = {r["image_file"]: r for r in records}
    assert by_file["10004.png"]["near_duplicate_of"] == "10002.png"
    assert by_file["10002.png"]["near_duplicate_of"] is None
    assert [(p["first"], p["second"]) for p in report.near_duplicates] == [("10002.png", "10004.png")]
    assert report.near_duplicates[0]["distance"] <= 4 and report.near_duplicate_count == 1
    # The colour captions need was measured on the image in memory: the same as reading the PNG back.
    for rec in records:
        with Image.open(out / "images" / rec["image_file"]) as im:
            colour, details = estimate_colour(im)
        assert rec["colour_estimate"] == {"colour": colour, "details": details}

    rejects = {r["source"]: r for r in report.rejects}
    dup = rejects["shoes/10001_copy.jpg"]
    assert dup["reason_code"] == "exact_duplicate" and dup["duplicate_of"] == "shoes/10001.jpg"
    assert rejects["bad/tiny.png"]["reason"] == "bad/tiny.png: image is 20×20, shorter side 20 < min_side 32"
    assert rejects["bad/bomb.png"]["reason_code"] == "decompression_bomb"
    assert all(r["reason"].startswith(r["source"] + ": ") for r in report.rejects)

    with open(out / "discard_report.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == DISCARD_COLUMNS
    assert [r["source"] for r in rows] == sorted(rejects)
    assert {r["source"]: r["duplicate_of"] for r in rows}["shoes/10001_copy.jpg"] == "shoes/10001.jpg"
    assert json.loads((out / "discard_report.json").read_text()) == report.rejects
    assert list(report.to_dataframe().columns) == DISCARD_COLUMNS and len(report.to_dataframe()) == 7

    leftovers = sorted(p.name for p in out.iterdir())
    assert leftovers == [CACHE_FILE, "discard_report.csv", "discard_report.json", "images", "manifest.json"]


def test_same_stem_gets_content_suffix(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    a = _save(_pattern(1), raw / "a" / "100.jpg", quality=90)
    b = _save(_pattern(2), raw / "b" / "100.png")
    c = _save(_pattern(3), raw / "b" / "100.webp", lossless=True)
    report = clean_images(scan_raw_dir(raw).manifest, tmp_path / "out", _params(), workers=1)
    names = {r["source"]: r["image_file"] for r in report.records}
    assert names == {
        "a/100.jpg": "100.png",
        "b/100.png": f"100_{file_sha256(b)[:8]}.png",
        "b/100.webp": f"100_{file_sha256(c)[:8]}.png",
    }
    assert {r["id"] for r in report.records} == {"100"}
    assert file_sha256(a)  # sources untouched and readable


def test_workers_do_not_change_results_and_raw_is_never_modified(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shoe_lora_pipeline.core.pool as pool

    monkeypatch.setattr(pool, "MIN_ITEMS_FOR_POOL", 1)  # these few files would otherwise run in-process
    before = _snapshot(raw)
    listing = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*"))
    manifest = scan_raw_dir(raw).manifest
    serial = clean_images(manifest, tmp_path / "w1", _params(), workers=1)
    parallel = clean_images(manifest, tmp_path / "w2", _params(), workers=2)
    assert _snapshot(raw) == before
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*")) == listing

    assert serial.records == parallel.records and serial.rejects == parallel.rejects
    for name in ("manifest.json", "discard_report.csv", "discard_report.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    images1 = {p.name: p.read_bytes() for p in (tmp_path / "w1" / "images").iterdir()}
    images2 = {p.name: p.read_bytes() for p in (tmp_path / "w2" / "images").iterdir()}
    assert images1 == images2 and len(images1) == 4


def test_broken_worker_pool_falls_back_in_process(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shoe_lora_pipeline.core.pool as pool

    class BrokenPool:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> BrokenPool:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def map(self, fn, jobs, chunksize=1):  # noqa: ANN001, ANN201 - mimics Executor.map
            yield fn(jobs[0])  # one result arrives, then the pool dies
            raise BrokenProcessPool("worker killed")

    monkeypatch.setattr(pool, "ProcessPoolExecutor", BrokenPool)
    monkeypatch.setattr(pool, "MIN_ITEMS_FOR_POOL", 1)
    with pytest.warns(RuntimeWarning, match="continuing in-process"):
        report = clean_images(scan_raw_dir(raw).manifest, tmp_path / "out", _params(), workers=2)
    assert report.processed_count == 9 and report.valid_count == 4


def test_incremental_reruns(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1)
    assert first.processed_count == 9  # unique non-empty files (empty/duplicate need no decode)

    again = clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1)
    assert (again.processed_count, again.reused_count, again.removed_count) == (0, 9, 0)
    assert again.records == first.records and again.rejects == first.rejects

    _save(_pattern(7), raw / "shoes" / "10005.png")
    _save(_pattern(8), raw / "shoes" / "10006.png")
    (out / ".clean_staging").mkdir()
    (out / ".clean_staging" / "junk.png").write_bytes(b"left over by a killed run")
    calls: list[tuple[int, int]] = []
    added = clean_images(
        scan_raw_dir(raw).manifest, out, _params(), workers=1, progress=lambda *a: calls.append(a)
    )
    assert added.processed_count == 2 and added.valid_count == 6
    assert calls == [(1, 2), (2, 2)] and not (out / ".clean_staging").exists()

    (raw / "shoes" / "10003.webp").unlink()
    removed = clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1)
    assert removed.processed_count == 0 and removed.removed_count == 1
    assert not (out / "images" / "10003.png").exists()
    assert "10003.png" not in {r["image_file"] for r in removed.records}

    _save(_pattern(9), raw / "shoes" / "10005.png")  # changed content, same name
    changed = clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1)
    assert changed.processed_count == 1 and changed.removed_count == 0

    (out / "images" / "10001.png").unlink()  # output lost outside the cleaner: rebuilt
    rebuilt = clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1)
    assert rebuilt.processed_count == 1 and (out / "images" / "10001.png").is_file()
    os.utime(out / "images" / "10002.png", ns=(1, 1))  # edited outside the cleaner: rebuilt
    assert clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1).processed_count == 1

    crop = clean_images(scan_raw_dir(raw).manifest, out, _params(resize_policy="crop"), workers=1)
    assert crop.processed_count == 10 and crop.reused_count == 0  # every unique non-empty file
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r["image_file"] for r in crop.records)


def test_rename_on_new_clash_reuses_output_without_decoding(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    b = _save(_pattern(2), raw / "b" / "100.png")
    clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1)
    old_bytes = (out / "images" / "100.png").read_bytes()
    _save(_pattern(1), raw / "a" / "100.png")  # sorts first, so it now owns "100.png"
    report = clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1)
    assert report.processed_count == 1 and report.reused_count == 1 and report.removed_count == 0
    moved = out / "images" / f"100_{file_sha256(b)[:8]}.png"
    assert moved.read_bytes() == old_bytes
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(["100.png", moved.name])


def test_file_changed_after_scan_is_not_cached(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    path = _save(_pattern(1), raw / "x.png")
    stale = scan_raw_dir(raw).manifest
    _save(_pattern(2), path)
    report = clean_images(stale, out, _params(), workers=1)
    assert report.valid_count == 0 and report.rejects[0]["reason_code"] == "read_error"
    assert "changed since the raw scan" in report.rejects[0]["reason"]
    fresh = clean_images(scan_raw_dir(raw).manifest, out, _params(), workers=1)
    assert fresh.processed_count == 1 and fresh.valid_count == 1


def test_manifest_round_tripped_through_csv(tmp_path: Path) -> None:
    """The Dagster layer stores the raw manifest as CSV and reads it back."""
    raw = tmp_path / "raw"
    _save(_pattern(1), raw / "00123.png")
    _save(_pattern(2), raw / "no_suffix", format="PNG")
    csv_path = tmp_path / "raw_manifest.csv"
    scan_raw_dir(raw).manifest.to_csv(csv_path, index=False)
    manifest = pd.read_csv(csv_path, dtype={"rel_path": str, "sha256": str})
    report = clean_images(manifest, tmp_path / "out", _params(), workers=1)
    assert {(r["image_file"], r["id"], r["format"]) for r in report.records} == {
        ("00123.png", "00123", "png"),
        ("no_suffix.png", "no_suffix", ""),
    }


def test_manifest_without_images_and_bad_columns(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "styles.csv").write_text("id\n")
    report = clean_images(scan_raw_dir(raw).manifest, tmp_path / "out", _params(), workers=0)
    assert (report.raw_count, report.valid_count, report.valid_ratio) == (0, 0, 0.0)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == []
    assert (tmp_path / "out" / "discard_report.csv").read_text() == ",".join(DISCARD_COLUMNS) + "\n"
    manifest = scan_raw_dir(raw).manifest.drop(columns=["sha256"])
    with pytest.raises(ValueError, match="sha256"):
        clean_images(manifest, tmp_path / "out", _params())


# --------------------------------------------------------------------------------------------------
# imagehash


def test_dct_matrix_is_orthonormal_dct_ii() -> None:
    d = dct_matrix(32)
    assert np.allclose(d @ d.T, np.eye(32))
    fft = pytest.importorskip("scipy.fft")
    x = np.random.default_rng(0).random(32)
    assert np.allclose(d @ x, fft.dct(x, norm="ortho"))


def test_phash_properties() -> None:
    a = _pattern(1, (200, 150))
    assert phash(a) == phash(a.copy())
    assert hamming_distance(phash(a), phash(a.resize((100, 75), Image.Resampling.LANCZOS))) <= 4
    assert hamming_distance(phash(a), phash(_pattern(2, (200, 150)))) > 10
    # A flat image hashes to "DC bit only" on every platform (float noise is rounded away).
    assert phash(Image.new("RGB", (50, 50), WHITE)) == 1 << 63
    text = phash_hex(a)
    assert len(text) == 16 and hex_to_hash(text) == phash(a) and hash_to_hex(phash(a)) == text
    assert hamming_distance(text, phash(a)) == 0 and hamming_distance(0, 0b1011) == 3
    with pytest.raises(ValueError):
        hex_to_hash("abc")


def test_pairwise_and_near_duplicate_pairs() -> None:
    hashes = [0b0000, 0xFFFF, 0b0011, 1 << 63]
    m = pairwise_hamming(hashes)
    assert m.shape == (4, 4) and (m == m.T).all() and (np.diag(m) == 0).all()
    assert m[0, 1] == 16 and m[0, 3] == 1
    assert list(hamming_to_set(0, hashes)) == [0, 16, 2, 1]
    assert near_duplicate_pairs(hashes, 2) == [(0, 2, 2), (0, 3, 1)]
    assert near_duplicate_pairs([hash_to_hex(h) for h in hashes], 0) == []
