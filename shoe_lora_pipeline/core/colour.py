"""The shoe's colour, named from the pixels of a cleaned product photo (white background).

Used by cleaning (estimated once per photo, from the image already in memory, and stored in the
cleaned manifest), by captions (for photos whose styles.csv row names no colour, or that have none)
and by the evaluation's colour check on generated images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

# Several sRGB prototypes per name: a name covers a range (light/dark blue are both "blue").
COLOUR_PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (20, 20, 20)),
    ("black", (45, 45, 48)),
    ("grey", (80, 80, 80)),
    ("grey", (128, 128, 128)),
    ("grey", (180, 180, 180)),
    ("white", (235, 235, 235)),
    ("white", (250, 250, 250)),
    ("brown", (70, 45, 25)),
    ("brown", (105, 65, 35)),
    ("brown", (140, 90, 50)),
    ("tan", (190, 140, 90)),
    ("beige", (220, 200, 165)),
    ("navy", (20, 25, 60)),
    ("navy", (35, 45, 90)),
    ("blue", (40, 80, 180)),
    ("blue", (30, 60, 140)),
    ("blue", (90, 140, 210)),
    ("red", (200, 30, 35)),
    ("red", (150, 25, 30)),
    ("green", (40, 130, 60)),
    ("green", (70, 100, 45)),
    ("yellow", (230, 200, 40)),
    ("orange", (235, 120, 30)),
    ("pink", (235, 150, 180)),
    ("purple", (110, 50, 130)),
)
FOREGROUND_DISTANCE = 10.0  # RGB distance from the background colour that counts as "object"
MIN_FOREGROUND_FRACTION = 0.005  # below this the shoe is (nearly) invisible on white: call it white
BORDER_FRACTION = 0.02
_ANALYSIS_SIDE = 256  # colour needs no detail: analyse a small copy (fast, and averages JPEG noise)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, shape (..., 3)) to CIE L*a*b* (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    lab = np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )
    return lab


# The palette's names and CIE Lab prototypes (also what evaluation's colour adherence compares against).
PALETTE_NAMES: tuple[str, ...] = tuple(name for name, _ in COLOUR_PALETTE)
PALETTE_LAB = srgb_to_lab(np.array([rgb for _, rgb in COLOUR_PALETTE], dtype=np.float64))


def nearest_colour_name(rgb: np.ndarray | tuple[float, float, float]) -> tuple[str, float, str, float]:
    """(best name, its ΔE76, runner-up name of a different colour, its ΔE76)."""
    lab = srgb_to_lab(np.asarray(rgb, dtype=np.float64))
    d = np.linalg.norm(PALETTE_LAB - lab, axis=1)
    order = np.argsort(d, kind="stable")
    best = PALETTE_NAMES[order[0]]
    second = next((i for i in order[1:] if PALETTE_NAMES[i] != best), order[0])
    return best, float(d[order[0]]), PALETTE_NAMES[second], float(d[second])


def estimate_colour(image: Image.Image) -> tuple[str, dict[str, Any]]:
    """Name the shoe's colour from its pixels.

    The background colour is the median of a thin border (falling back to pure white when the border
    is not near-white, e.g. a shoe touching the frame); foreground is every inner pixel farther than
    ``FOREGROUND_DISTANCE`` from it. The threshold is deliberately low so that a white shoe's light
    body counts as foreground (a "channel < 235" rule would keep only its grey outline and call it
    grey). The per-channel median of the foreground is named by the nearest palette colour in CIE
    Lab (ΔE76). An (almost) empty foreground means a white shoe on white: "white", low confidence.
    """
    img = image.convert("RGB")
    if max(img.size) > _ANALYSIS_SIDE:
        img = img.copy()
        img.thumbnail((_ANALYSIS_SIDE, _ANALYSIS_SIDE), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape[:2]
    b = max(1, round(BORDER_FRACTION * min(h, w)))
    if h <= 2 * b + 1 or w <= 2 * b + 1:
        b = 0
    white = np.array([255.0, 255.0, 255.0], dtype=np.float32)
    if b:
        ring = np.concatenate(
            [
                arr[:b].reshape(-1, 3),
                arr[-b:].reshape(-1, 3),
                arr[b:-b, :b].reshape(-1, 3),
                arr[b:-b, -b:].reshape(-1, 3),
            ]
        )
        background = np.median(ring, axis=0)
        inner = arr[b:-b, b:-b]
    else:
        background = white
        inner = arr
    if float(np.linalg.norm(background - white)) > 40.0:
        background = white
    pixels = inner.reshape(-1, 3)
    dist = np.linalg.norm(pixels - background, axis=1)
    fg = pixels[dist > FOREGROUND_DISTANCE]
    fraction = float(len(fg)) / max(1, len(pixels))
    details: dict[str, Any] = {
        "foreground_fraction": round(fraction, 4),
        "background_rgb": [int(round(float(v))) for v in background],
    }
    if fraction < MIN_FOREGROUND_FRACTION:
        details.update({"median_rgb": None, "delta_e": None, "confidence": "low", "reason": "no foreground"})
        return "white", details
    median = np.median(fg, axis=0)
    name, de, second, de2 = nearest_colour_name(median)
    # Confident when the colour sits close to a palette entry and clearly nearer than any other name.
    confidence = "high" if de < 20 and de2 - de > 5 else "low"
    details.update(
        {
            "median_rgb": [int(round(float(v))) for v in median],
            "delta_e": round(de, 2),
            "runner_up": second,
            "runner_up_delta_e": round(de2, 2),
            "confidence": confidence,
        }
    )
    return name, details
