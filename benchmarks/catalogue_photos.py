"""Catalogue-size sets of synthetic product photos for the data-stage benchmark (fixed seed).

Drawing a shoe takes most of a second (``scripts/shoe_drawing.py`` supersamples every shape), so a bank
of shoes is drawn once (pair shots and tilted shots included, each with its soft contact shadow) and
every photo is one bank shot, rescaled, maybe mirrored, colour-jittered and placed off-centre on a white
1080×1440 canvas, saved as a JPEG: different bytes and a different perceptual hash for every photo,
the size and JPEG statistics of a fashion-product image set. The folder also gets what a catalogue dump
carries: ``styles.csv`` rows for most photos, a few ``.txt`` sidecars and a ``metadata.jsonl``.
Photo ``i`` depends only on the seed and ``i``, so a set of N+10 photos is the set of N plus 10 more.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from shoe_drawing import (  # noqa: E402  (scripts/ is not a package)
    ARTICLES,
    UPPER_SHADES,
    ShoeSpec,
    ShotLayout,
    arrange,
    make_spec,
    place,
    render_shoe,
)

from shoe_lora_pipeline.core.styles import STYLES_COLUMNS  # noqa: E402

FIRST_ID = 20001
BANK_SIZE = 32
STYLES_HEADER = (
    "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
)


@dataclass(frozen=True)
class BankShot:
    spec: ShoeSpec
    layer: Image.Image  # RGBA, cropped to the shoe(s) + shadow


def _bank_shot(args: tuple[int, int, int]) -> BankShot:
    seed, index, length = args
    rng = random.Random(seed * 7919 + index)
    colour = rng.choice(sorted(UPPER_SHADES))
    spec = make_spec(rng, colour, rng.choice(ARTICLES))
    shoe = render_shoe(spec, length)
    layout = ShotLayout(
        0.0, 0.0, rng.uniform(2.0, 6.0) * rng.choice([-1, 1]) if index % 5 == 4 else 0.0, index % 7 == 3
    )
    group = arrange(shoe, spec, layout, length)
    shot = place(group, (round(group.width * 1.1), round(group.height * 1.2)), layout)
    return BankShot(spec, shot.crop(shot.getchannel("A").getbbox()))


_BANK: list[BankShot] = []


def draw_bank(seed: int, size: tuple[int, int], workers: int) -> list[BankShot]:
    length = round(size[0] * 0.8)
    jobs = [(seed, i, length) for i in range(BANK_SIZE)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_bank_shot, jobs)


def _jitter(layer: Image.Image, rng: random.Random) -> Image.Image:
    """Small per-channel gain (lighting/white balance differences between shoots)."""
    gains = [rng.uniform(0.92, 1.08) for _ in range(3)]
    lut = [min(255, round(v * g)) for g in gains for v in range(256)] + list(range(256))
    return layer.point(lut)


def photo(seed: int, index: int, size: tuple[int, int]) -> tuple[bytes, ShoeSpec]:
    """JPEG bytes of photo ``index`` and the spec of the shoe it shows."""
    import io

    rng = random.Random(seed * 1_000_003 + index)
    shot = _BANK[rng.randrange(len(_BANK))]
    w, h = size
    scale = rng.uniform(0.72, 1.0) * min(1.0, w * 0.92 / shot.layer.width)
    layer = shot.layer.resize(
        (max(1, round(shot.layer.width * scale)), max(1, round(shot.layer.height * scale))),
        Image.Resampling.BICUBIC,
    )
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    layer = _jitter(layer, rng)
    canvas = Image.new("RGB", size, (255, 255, 255))
    x = round((w - layer.width) / 2 + rng.uniform(-0.12, 0.12) * w)
    y = round((h - layer.height) / 2 + rng.uniform(-0.2, 0.2) * h)
    x, y = min(max(0, x), w - layer.width), min(max(0, y), h - layer.height)
    canvas.paste(layer, (x, y), layer)
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=rng.randint(86, 93))
    return buf.getvalue(), shot.spec


def _write_photo(args: tuple[int, int, tuple[int, int], str]) -> tuple[int, str, str]:
    seed, index, size, out = args
    data, spec = photo(seed, index, size)
    (Path(out) / f"{FIRST_ID + index}.jpg").write_bytes(data)
    return index, spec.colour, spec.article


def _styles_row(photo_id: int, colour: str, article: str) -> str:
    gender = ("Men", "Women", "Unisex")[photo_id % 3]
    return f"{photo_id},{gender},Footwear,Shoes,{article},{colour},Fall,2016,Casual,Benchmark {gender} {colour} {article}"


def write_photos(
    out: Path, seed: int, start: int, count: int, size: tuple[int, int], workers: int
) -> list[tuple[int, str, str]]:
    """Photos ``start .. start+count-1`` into ``out``; returns (index, colour, articleType) of each."""
    global _BANK
    out.mkdir(parents=True, exist_ok=True)
    if not _BANK:
        _BANK = draw_bank(seed, size, workers)
    jobs = [(seed, i, size, str(out)) for i in range(start, start + count)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # forked after the bank exists
        return pool.map(_write_photo, jobs, chunksize=16)


def write_catalogue_files(out: Path, facts: list[tuple[int, str, str]]) -> None:
    """styles.csv (every photo but each 10th), a sidecar for each 50th and metadata.jsonl for each 25th,
    for the photos ``facts`` describes (as :func:`write_photos` returns them)."""
    rows = [",".join(STYLES_COLUMNS)]
    meta = []
    for index, colour, article in sorted(facts):
        pid = FIRST_ID + index
        if index % 10 != 7:
            rows.append(_styles_row(pid, colour, article))
        if index % 50 == 11:
            text = f"A professional product photo of {colour.lower()} {article.lower()} on white background, side view"
            (out / f"{pid}.txt").write_text(text + "\n", encoding="utf-8")
        if index % 25 == 13:
            meta.append({"file_name": f"{pid}.jpg", "text": f"a {colour.lower()} shoe, catalogue shot {pid}"})
    (out / "styles.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (out / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta), encoding="utf-8")
