"""The geometric QA checks fail on noise and on flat images, and pass on drawn shoes (issue 19).

The shoes come from ``scripts/shoe_drawing.py`` (the same drawings as the demo data and the tiny-shoes
pretraining set), on white and on the other pretraining backdrops.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shoe_lora_pipeline.core.evaluation import qa

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import shoe_drawing  # noqa: E402  (scripts/ is not a package)

GEOMETRIC = ("white_background", "centring", "single_object", "fill")
PROMPT = "A professional product photo of {} casual shoes on white background, side view, product photography"


def _checks(img: Image.Image, colour: str = "black") -> dict[str, qa.QAValue]:
    r = qa.image_qa(img, PROMPT.format(colour))
    return {name: getattr(r, name) for name in (*GEOMETRIC, "colour")}


def _noise(seed: int, side: int, lo: int = 0, hi: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(lo, hi, (side, side, 3), dtype=np.uint8), "RGB")


def _drawn(seed: int, side: int, backdrop: str = "white") -> tuple[Image.Image, str]:
    rng = random.Random(seed)
    colour = rng.choice(["Black", "Brown", "Blue", "Red", "Green"])
    spec = shoe_drawing.make_spec(rng, colour, rng.choice(shoe_drawing.ARTICLES))
    layer = shoe_drawing.compose(spec, (side, side), rng)
    img = shoe_drawing.background(rng, (side, side), backdrop).convert("RGBA")
    img.alpha_composite(layer)
    return img.convert("RGB"), colour.lower()


@pytest.mark.parametrize(
    "image",
    [
        _noise(0, 128),
        _noise(1, 512),
        _noise(2, 256, 100, 160),  # grey-ish noise: no white in it at all
        _noise(3, 256, 200, 256),  # light noise: pale, but no plain backdrop
        Image.new("RGB", (128, 128), (128, 128, 128)),
        Image.new("RGB", (512, 512), (200, 200, 200)),
    ],
    ids=["noise128", "noise512", "grey-noise", "light-noise", "flat-grey128", "flat-grey512"],
)
def test_every_geometric_check_fails_on_noise_and_flat_grey(image: Image.Image) -> None:
    checks = _checks(image)
    for name in GEOMETRIC:
        assert checks[name].passed is False, (name, checks[name])
    assert not qa.image_qa(image, PROMPT.format("black")).product_shot


def test_noise_is_refused_for_its_backdrop_with_a_reason() -> None:
    r = qa.single_object(_noise(4, 128))
    assert r.passed is False and "no plain backdrop" in r.details["reason"]
    flat = qa.centring(Image.new("RGB", (128, 128), (128, 128, 128)))
    assert flat.passed is False and "no foreground" in flat.details["reason"]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("side", [128, 512])
def test_drawn_shoes_on_white_pass_every_check(seed: int, side: int) -> None:
    img, colour = _drawn(seed, side)
    checks = _checks(img, colour)
    for name, value in checks.items():
        assert value.passed is True, (name, value)
    assert checks["fill"].details["shoe_shaped"]
    assert qa.image_qa(img, PROMPT.format(colour)).product_shot


@pytest.mark.parametrize("backdrop", ["light grey", "grey", "beige", "gradient", "dark"])
def test_drawn_shoes_on_other_backdrops_pass_geometry_but_not_whiteness(backdrop: str) -> None:
    for seed in range(3):
        img, colour = _drawn(100 + seed, 128, backdrop)
        checks = _checks(img, colour)
        assert checks["white_background"].passed is False
        for name in ("centring", "single_object", "fill", "colour"):
            assert checks[name].passed is True, (backdrop, seed, name, checks[name])


def test_fill_fails_for_a_tiny_or_a_cropped_product() -> None:
    img, _ = _drawn(7, 512)
    tiny = Image.new("RGB", (512, 512), (255, 255, 255))
    tiny.paste(img.resize((96, 96), Image.Resampling.LANCZOS), (208, 208))
    r = qa.fill(tiny)
    assert r.passed is False and r.value < qa.FILL_MIN
    box = qa.find_product(qa._as_array(img)).bbox()
    scale = 256 / (box[2] - box[0])
    big = img.resize((round(512 * scale * 1.4), round(512 * scale * 1.4)), Image.Resampling.LANCZOS)
    cropped = big.crop(
        ((big.width - 512) // 2, (big.height - 512) // 2, (big.width + 512) // 2, (big.height + 512) // 2)
    )
    assert qa.fill(cropped).passed is False
