#!/usr/bin/env python
"""Draw the bundled demo data set: ~100 synthetic side-view shoe "product photos" plus edge cases.

Usage: ``python scripts/make_demo_data.py [--out data/casual_shoes/raw]``

Every random choice comes from fixed seeds and nothing time-dependent is written (no EXIF dates,
no PNG time chunks), so two runs produce byte-identical files with the same Pillow/libjpeg/libwebp
builds. The script only writes its own file names and never deletes anything. See data/README.md
for what the files are and which ones are deliberately broken.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import struct
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageOps

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "casual_shoes" / "raw"

SEED = 20240611
FIRST_ID = 10001
N_VALID = 100
LAYOUT_CANDIDATES = 32

RGB = tuple[int, int, int]
Point = tuple[float, float]

STYLES_HEADER = (
    "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
)
# Invented brand names: the demo should not look like it ships anyone's catalogue.
BRANDS = ["Fieldcraft", "Urban Step", "Northwalk", "Maple & Co", "Streetline", "Cobblestone", "Kestrel"]
SEASONS = ["Summer", "Fall", "Winter", "Spring"]


# --------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------

# baseColour (styles.csv spelling) -> candidate upper colours. Several shades per name so the
# set is not 18 identical blacks; they all still read unambiguously as that colour name.
UPPER_SHADES: dict[str, list[RGB]] = {
    "Black": [(38, 38, 41), (30, 30, 30), (46, 44, 44)],
    "Brown": [(112, 66, 36), (136, 84, 46), (88, 54, 32), (150, 96, 54)],
    "White": [(241, 240, 236), (236, 236, 234), (244, 242, 237)],
    "Blue": [(44, 94, 170), (52, 110, 190), (38, 82, 150)],
    "Grey": [(128, 130, 135), (150, 150, 152), (106, 108, 112)],
    "Red": [(178, 36, 42), (160, 30, 38)],
    "Navy Blue": [(30, 40, 80), (26, 34, 66)],
    "Beige": [(214, 196, 160), (204, 184, 146)],
    "Green": [(70, 110, 70), (88, 104, 58)],
}
# How many of the 100 valid images get each colour: the seed colours dominate.
COLOUR_COUNTS = {
    "Black": 18,
    "Brown": 18,
    "White": 17,
    "Blue": 17,
    "Grey": 7,
    "Navy Blue": 7,
    "Red": 6,
    "Beige": 5,
    "Green": 5,
}
# Loafers in white/red/green are rare in a casual catalogue; keep the types plausible per colour.
TYPE_WEIGHTS: dict[str, tuple[float, float, float]] = {  # (Casual Shoes, Sneakers, Loafers)
    "Black": (0.45, 0.30, 0.25),
    "Brown": (0.50, 0.10, 0.40),
    "White": (0.35, 0.65, 0.0),
    "Blue": (0.45, 0.45, 0.10),
    "Grey": (0.45, 0.55, 0.0),
    "Navy Blue": (0.40, 0.35, 0.25),
    "Red": (0.40, 0.60, 0.0),
    "Beige": (0.45, 0.15, 0.40),
    "Green": (0.55, 0.45, 0.0),
}
ARTICLES = ("Casual Shoes", "Sneakers", "Loafers")
WHITE: RGB = (255, 255, 255)


def mix(a: RGB, b: RGB, t: float) -> RGB:
    """Linear blend a->b; used to derive darker/lighter tones from one base colour."""
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def luminance(c: RGB) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


# --------------------------------------------------------------------------------------------
# Shoe description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShoeSpec:
    article: str  # styles.csv articleType
    colour: str  # styles.csv baseColour
    upper: RGB
    panel: RGB  # heel counter / toe cap tone
    accent: RGB  # sneaker side stripe
    sole: RGB
    outsole: RGB  # bottom tread band / heel block
    lace: RGB
    outline: RGB
    stitch: RGB
    sole_t: float  # forefoot sole thickness (shoe-length units)
    heel_t: float  # sole thickness at the heel (heel block)
    arch: float  # how far the sole underside lifts off the ground under the arch
    collar_h: float
    tongue_h: float
    vamp: float  # scales the height of the vamp line
    toe_h: float
    height_scale: float
    gloss: float  # leather highlight strength
    stripe: bool
    toe_cap: bool
    eyelets: int
    facing_left: bool


def make_spec(rng: random.Random, colour: str, article: str) -> ShoeSpec:
    """Pick all colours/proportions of one shoe from ``rng``."""
    upper = rng.choice(UPPER_SHADES[colour])
    light = luminance(upper) > 190
    dark = luminance(upper) < 60
    # A white shoe on a white background needs a clearly visible grey outline.
    outline = (150, 150, 152) if light else mix(upper, (0, 0, 0), 0.55)
    panel = mix(upper, (0, 0, 0), 0.12) if not light else (226, 225, 221)
    if article == "Sneakers":
        sole = rng.choice([(246, 246, 243), (240, 238, 232)]) if not light else (250, 250, 248)
        outsole = rng.choice([(70, 70, 72), mix(upper, (0, 0, 0), 0.2), (190, 132, 76)])
        if light:
            outsole = rng.choice([(200, 200, 200), (190, 132, 76), (60, 60, 62)])
        sole_t = rng.uniform(0.075, 0.095)
        heel_t, arch = sole_t + rng.uniform(0.0, 0.01), 0.0
        gloss = rng.uniform(0.05, 0.12)
    elif article == "Loafers":
        sole = rng.choice([(52, 36, 26), (34, 32, 30), (74, 48, 30)])
        outsole = mix(sole, (0, 0, 0), 0.25)
        sole_t = rng.uniform(0.032, 0.04)
        heel_t, arch = rng.uniform(0.065, 0.08), rng.uniform(0.028, 0.036)
        gloss = rng.uniform(0.22, 0.38)
    else:
        sole = rng.choice([(190, 132, 76), (56, 42, 32), (238, 236, 230), (36, 36, 36)])
        if light:
            sole = rng.choice([(190, 132, 76), (214, 212, 206)])
        outsole = mix(sole, (0, 0, 0), 0.2)
        sole_t = rng.uniform(0.05, 0.062)
        heel_t, arch = sole_t + rng.uniform(0.012, 0.02), rng.uniform(0.008, 0.014)
        gloss = rng.uniform(0.12, 0.26)
    accent_choices: list[RGB] = [(245, 245, 242), mix(upper, (0, 0, 0), 0.35)]
    if light:
        accent_choices = [(30, 40, 80), (178, 36, 42), (150, 150, 152), (44, 94, 170)]
    elif not dark:
        accent_choices.append((245, 245, 242))
    lace = (245, 245, 242) if dark and rng.random() < 0.5 else mix(upper, (0, 0, 0), 0.25)
    if light:
        lace = (246, 245, 242)
    stitch = mix(upper, WHITE, 0.45) if luminance(upper) < 140 else mix(upper, (0, 0, 0), 0.3)
    if article == "Sneakers":
        collar_h = rng.uniform(0.33, 0.38)
        tongue_h = collar_h + rng.uniform(0.045, 0.07)
    elif article == "Loafers":
        collar_h = rng.uniform(0.25, 0.28)
        tongue_h = collar_h
    else:
        collar_h = rng.uniform(0.29, 0.33)
        tongue_h = collar_h + rng.uniform(0.03, 0.05)
    return ShoeSpec(
        article=article,
        colour=colour,
        upper=upper,
        panel=panel,
        accent=rng.choice(accent_choices),
        sole=sole,
        outsole=outsole,
        lace=lace,
        outline=outline,
        stitch=stitch,
        sole_t=sole_t,
        heel_t=heel_t,
        arch=arch,
        collar_h=collar_h,
        tongue_h=tongue_h,
        vamp=rng.uniform(0.93, 1.07),
        toe_h=rng.uniform(0.13, 0.155),
        height_scale=rng.uniform(1.06, 1.18),
        gloss=gloss,
        stripe=article == "Sneakers" and rng.random() < 0.75,
        toe_cap=rng.random() < 0.6,
        eyelets=rng.choice([4, 5, 5, 6]) if article == "Sneakers" else rng.choice([3, 4, 4]),
        facing_left=rng.random() < 0.4,
    )


# --------------------------------------------------------------------------------------------
# Geometry (shoe-length units: x=0 heel .. x=1 toe, y=0 ground, y up)
# --------------------------------------------------------------------------------------------


def spline(points: list[Point], closed: bool = True, samples: int = 20) -> np.ndarray:
    """Catmull-Rom curve through ``points``: smooth outlines from a handful of control points."""
    p = np.asarray(points, dtype=np.float64)
    n = len(p)
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[:, None]
    out = []
    for i in range(n if closed else n - 1):
        if closed:
            p0, p1, p2, p3 = p[(i - 1) % n], p[i], p[(i + 1) % n], p[(i + 2) % n]
        else:
            p0, p1, p2, p3 = p[max(i - 1, 0)], p[i], p[i + 1], p[min(i + 2, n - 1)]
        out.append(
            0.5
            * (
                2 * p1
                + (p2 - p0) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (3 * p1 - p0 - 3 * p2 + p3) * t**3
            )
        )
    if not closed:
        out.append(p[-1:])
    return np.vstack(out)


def upper_profile(s: ShoeSpec) -> tuple[list[Point], tuple[int, int]]:
    """Control points of the upper and the index range that forms the collar (top opening)."""
    ts, hb, ch, th, v, tz = s.sole_t, s.heel_t, s.collar_h, s.tongue_h, s.vamp, s.toe_h
    # Bottom points sit a little inside the sole so the sole drawn on top hides the seam.
    bottom = [(1.0, ts + 0.02), (0.96, ts - 0.012), (0.6, ts - 0.012), (0.25, hb - 0.012)]
    if s.article == "Sneakers":
        pts = [
            (0.04, hb - 0.012),
            (0.0, hb + 0.06),
            (-0.006, 0.5 * (hb + ch) + 0.04),
            (0.012, ch + 0.012),  # heel tab
            (0.06, ch + 0.004),
            (0.16, ch - 0.05),  # collar dip behind the ankle
            (0.26, ch - 0.035),
            (0.315, th),  # tongue
            (0.36, th - 0.01),
            (0.45, 0.31 * v),
            (0.58, 0.255 * v),
            (0.72, 0.21 * v),
            (0.85, 0.175 * v),
            (0.935, tz),
            (0.985, tz - 0.035),
            *bottom,
        ]
        collar = (3, 7)
    elif s.article == "Loafers":
        pts = [
            (0.04, hb - 0.012),
            (0.0, hb + 0.05),
            (0.004, ch - 0.035),
            (0.03, ch),
            (0.13, ch - 0.03),
            (0.27, ch - 0.045),  # lowest point of the opening
            (0.37, 0.255 * v),  # the vamp rises to a closed throat
            (0.45, 0.262 * v),
            (0.58, 0.236 * v),
            (0.72, 0.2 * v),
            (0.85, 0.168 * v),
            (0.935, tz),
            (0.985, tz - 0.037),
            *bottom,
        ]
        collar = (3, 6)
    else:
        pts = [
            (0.04, hb - 0.012),
            (0.0, hb + 0.055),
            (-0.004, 0.5 * (hb + ch) + 0.02),
            (0.02, ch + 0.005),
            (0.12, ch - 0.02),
            (0.25, ch - 0.02),
            (0.30, th),  # tongue
            (0.345, th - 0.008),
            (0.44, 0.29 * v),
            (0.57, 0.24 * v),
            (0.71, 0.198 * v),
            (0.84, 0.168 * v),
            (0.935, tz),
            (0.985, tz - 0.037),
            *bottom,
        ]
        collar = (3, 6)
    return pts, collar


def sole_profile(s: ShoeSpec) -> list[Point]:
    ts, hb, a = s.sole_t, s.heel_t, s.arch
    if s.article == "Sneakers":
        # Thick cupsole with a toe bumper that wraps up the front.
        return [
            (0.02, hb + 0.008),
            (-0.016, hb * 0.55),
            (0.0, 0.012),
            (0.05, 0.0),
            (0.5, 0.0),
            (0.84, 0.003),
            (0.95, 0.018),
            (1.008, 0.05),
            (1.012, ts + 0.02),
            (0.975, ts + 0.012),
            (0.85, ts - 0.006),
            (0.5, ts - 0.01),
            (0.15, hb - 0.002),
        ]
    # Leather-style sole: a heel block at the back, the underside lifted under the arch.
    return [
        (0.01, hb + 0.004),
        (-0.008, hb * 0.5),
        (0.006, 0.0),
        (0.1, 0.0),
        (0.205, 0.0),
        (0.225, a * 0.8),
        (0.3, a),
        (0.48, a * 0.75),
        (0.64, 0.004),
        (0.8, 0.0),
        (0.93, 0.01),
        (1.006, 0.04),
        (1.008, ts + 0.016),
        (0.97, ts + 0.006),
        (0.6, ts),
        (0.35, 0.5 * (ts + hb)),
        (0.2, hb),
    ]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


class Frame:
    """Maps shoe units to pixels of a supersampled canvas (toe always to the right here)."""

    def __init__(self, length_px: float, spec: ShoeSpec) -> None:
        self.L = length_px
        self.hs = spec.height_scale
        self.w = math.ceil(length_px * 1.09)
        self.h = math.ceil(length_px * 0.5 * self.hs)
        self.x0 = length_px * 0.04
        self.y0 = self.h - length_px * 0.02

    def px(self, pts: np.ndarray | list[Point]) -> list[Point]:
        a = np.asarray(pts, dtype=np.float64)
        xs = self.x0 + a[:, 0] * self.L
        ys = self.y0 - a[:, 1] * self.L * self.hs
        return list(zip(xs.tolist(), ys.tolist(), strict=True))

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Shoe-unit coordinates of every pixel (broadcastable), for shading fields."""
        xs = (np.arange(self.w, dtype=np.float32) - self.x0) / self.L
        ys = (self.y0 - np.arange(self.h, dtype=np.float32)) / (self.L * self.hs)
        return xs[None, :], ys[:, None]

    def len(self, units: float) -> int:
        return max(1, round(units * self.L))


def polygon_mask(frame: Frame, pts: list[Point]) -> Image.Image:
    m = Image.new("L", (frame.w, frame.h), 0)
    ImageDraw.Draw(m).polygon(pts, fill=255)
    return m


def fill_shaded(layer: Image.Image, mask: Image.Image, base: RGB, shade: np.ndarray, hl: np.ndarray) -> None:
    """Composite ``base`` modulated by a shading field (multiply) and highlight (screen) under ``mask``."""
    c = np.asarray(base, dtype=np.float32)[None, None, :] * shade[..., None]
    c = c + (255.0 - c) * hl[..., None]
    # Keep even the brightest highlight off pure white so the shoe never melts into the background.
    img = Image.fromarray(np.clip(c, 0, 250).astype(np.uint8), "RGB")
    img.putalpha(mask)
    layer.alpha_composite(img)


def dashed(
    draw: ImageDraw.ImageDraw, pts: list[Point], dash: float, gap: float, fill: RGB, width: int
) -> None:
    """Stitching: a dashed polyline measured along its arc length."""
    a = np.asarray(pts)
    seg = np.hypot(*np.diff(a, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    period = dash + gap
    start = 0.0
    while start < s[-1]:
        end = min(start + dash, s[-1])
        ts = np.linspace(start, end, 6)
        xs = np.interp(ts, s, a[:, 0])
        ys = np.interp(ts, s, a[:, 1])
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=fill, width=width)
        start += period


def top_edge(mask: np.ndarray, x_px: float) -> float:
    """Row of the topmost upper pixel in column ``x_px`` (laces sit on the top edge)."""
    col = mask[:, int(round(x_px))]
    rows = np.nonzero(col > 127)[0]
    return float(rows[0]) if len(rows) else float(mask.shape[0] // 2)


def offset_curve(curve: np.ndarray, dy: float) -> np.ndarray:
    c = curve.copy()
    c[:, 1] += dy
    return c


def render_shoe(spec: ShoeSpec, length_px: int) -> Image.Image:
    """Draw one shoe on a transparent layer.

    The layer is already downsampled: the shoe is about ``length_px`` long.
    """
    ss = 3 if length_px <= 520 else 2  # supersampling = anti-aliasing for ImageDraw shapes
    f = Frame(length_px * ss, spec)
    layer = Image.new("RGBA", (f.w, f.h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    xs, ys = f.grid()
    lw = f.len(0.0035)  # outline width

    # --- upper: rounded-looking body from a blurred-mask edge falloff + vertical light gradient
    u_pts, (c0, c1) = upper_profile(spec)
    n_per = 20
    u_curve = spline(u_pts, samples=n_per)
    u_px = f.px(u_curve)
    u_mask = polygon_mask(f, u_px)
    soft = np.asarray(u_mask.filter(ImageFilter.GaussianBlur(f.L * 0.03)), dtype=np.float32) / 255.0
    top = max(spec.tongue_h, spec.collar_h)
    shade = (0.80 + 0.26 * np.clip(ys / top, 0, 1)) * (0.70 + 0.30 * np.clip(soft * 1.6 - 0.3, 0, 1))
    shade = shade * (1.0 - 0.10 * np.exp(-np.clip(xs, 0, None) / 0.05))  # heel turns away from light
    g = spec.gloss
    hl = g * np.exp(-(((xs - 0.76) / 0.13) ** 2) - ((ys - 0.15) / 0.045) ** 2)
    hl = hl + 0.6 * g * np.exp(-(((xs - 0.09) / 0.06) ** 2) - ((ys - 0.2) / 0.07) ** 2)
    hl = hl + 0.35 * g * np.exp(-(((xs - 0.5) / 0.2) ** 2) - ((ys - 0.24) / 0.03) ** 2)
    hl = np.broadcast_to(hl, shade.shape)
    shade = np.broadcast_to(shade, (f.h, f.w)).astype(np.float32)
    fill_shaded(layer, u_mask, spec.upper, shade, hl)

    def panel(points: list[Point], colour: RGB) -> None:
        m = ImageChops.darker(polygon_mask(f, f.px(spline(points))), u_mask)
        fill_shaded(layer, m, colour, shade, hl)

    def seam(points: list[Point], closed: bool = False, dash: bool = True) -> None:
        curve = f.px(spline(points, closed=closed))
        draw.line(curve, fill=spec.outline, width=max(1, lw // 2 + 1), joint="curve")
        if dash:
            sc = f.px(offset_curve(spline(points, closed=closed), -0.012))
            dashed(draw, sc, f.len(0.012), f.len(0.008), spec.stitch, max(1, lw // 2))

    ts, hb = spec.sole_t, spec.heel_t
    mask_arr = np.asarray(u_mask)

    def edge_y(x: float) -> float:
        """Height (shoe units) of the upper's top edge at x."""
        return (f.y0 - top_edge(mask_arr, f.x0 + x * f.L)) / (f.L * f.hs)

    if spec.article != "Loafers":
        # Tongue: a separate, slightly different-toned panel poking out above the throat.
        tongue = [(0.27, 0.6), (0.42, 0.6), (0.4, edge_y(0.4) - 0.02), (0.3, edge_y(0.3) - 0.05)]
        panel(tongue, mix(spec.upper, WHITE if luminance(spec.upper) < 90 else (0, 0, 0), 0.1))
        seam(tongue[2:], dash=False)
    if spec.article == "Sneakers":
        # Heel counter, mudguard/toe cap and a brand-free side stripe.
        panel([(-0.1, 0.28), (0.06, 0.28), (0.16, 0.2), (0.2, hb), (-0.1, hb - 0.05)], spec.panel)
        seam([(0.0, 0.28), (0.06, 0.275), (0.16, 0.2), (0.2, hb + 0.005)])
        if spec.toe_cap:
            panel([(0.66, ts - 0.02), (0.72, 0.13), (0.85, 0.16), (1.1, 0.21), (1.1, -0.05)], spec.panel)
            seam([(0.67, ts + 0.005), (0.72, 0.125), (0.84, 0.153), (0.95, 0.138)])
        if spec.stripe:
            stripe = [(0.22, ts + 0.02), (0.4, 0.165), (0.6, edge_y(0.6) - 0.01), (0.63, edge_y(0.63) - 0.05)]
            stripe += [(0.43, 0.115), (0.3, ts + 0.012)]
            panel(stripe, spec.accent)
            seam(stripe, closed=True, dash=False)
        # Eyestay: the lace panel edge running down from the tongue.
        seam(
            [
                (0.33, edge_y(0.33) - 0.06),
                (0.4, edge_y(0.4) - 0.05),
                (0.55, edge_y(0.55) - 0.05),
                (0.7, edge_y(0.7) - 0.03),
            ]
        )
    elif spec.article == "Loafers":
        # Moc-toe apron seam (raised: dark line + stitches) and a penny strap across the saddle.
        apron = [(0.4, edge_y(0.4) - 0.025), (0.6, edge_y(0.6) - 0.05), (0.8, edge_y(0.8) - 0.05)]
        apron += [(0.93, edge_y(0.93) - 0.045), (0.99, ts + 0.03)]
        seam(apron)
        y0, y1 = edge_y(0.34) - 0.012, edge_y(0.56) - 0.014
        strap = [(0.33, y0), (0.45, 0.5 * (y0 + y1) + 0.004), (0.57, y1), (0.57, y1 - 0.042)]
        strap += [(0.45, 0.5 * (y0 + y1) - 0.04), (0.33, y0 - 0.045)]
        panel(strap, mix(spec.upper, (0, 0, 0), 0.12))
        seam(strap, closed=True, dash=False)
        sx, sy = 0.45, 0.5 * (y0 + y1) - 0.018  # the "penny" slot
        slot = f.px([(sx - 0.04, sy + 0.002), (sx + 0.04, sy - 0.002)])
        draw.line(slot, fill=mix(spec.upper, (0, 0, 0), 0.65), width=f.len(0.012))
        panel([(-0.1, 0.21), (0.05, 0.21), (0.14, 0.15), (0.17, hb), (-0.1, hb - 0.05)], spec.panel)
        seam([(0.0, 0.21), (0.05, 0.206), (0.14, 0.15), (0.17, hb + 0.005)])
    else:
        panel([(-0.1, 0.25), (0.05, 0.245), (0.15, 0.17), (0.19, hb), (-0.1, hb - 0.05)], spec.panel)
        seam([(0.0, 0.25), (0.05, 0.245), (0.15, 0.17), (0.19, hb + 0.005)])
        # Derby quarter seam running from the collar front down to the sole.
        seam([(0.31, edge_y(0.31) - 0.06), (0.37, 0.2), (0.4, 0.13), (0.42, ts + 0.01)])
        if spec.toe_cap:
            seam([(0.76, ts + 0.005), (0.78, 0.12), (0.83, edge_y(0.83) - 0.005)])

    # Collar: padded opening rendered as a thick, darker lining edge.
    collar_curve = u_curve[c0 * n_per : c1 * n_per + 1]
    lining = mix(spec.upper, (0, 0, 0), 0.5) if luminance(spec.upper) > 70 else (70, 62, 56)
    draw.line(f.px(collar_curve), fill=lining, width=f.len(0.012), joint="curve")

    # Outline of the upper.
    draw.line([*u_px, u_px[0]], fill=spec.outline, width=lw, joint="curve")

    # Laces: eyelets along the throat, lace bars zig-zagging over the top edge, a small bow.
    if spec.article != "Loafers":
        xa, xb = (0.385, 0.64) if spec.article == "Sneakers" else (0.365, 0.58)
        lw_lace = f.len(0.014)
        lw_thin = max(1, lw_lace - 1)
        lace_edge = mix(spec.lace, (0, 0, 0), 0.4)
        holes = []
        for i in range(spec.eyelets):
            x = xa + (xb - xa) * i / max(1, spec.eyelets - 1)
            xp = f.x0 + x * f.L
            yt = top_edge(mask_arr, xp)
            holes.append((xp, yt + f.len(0.028), yt))
        for i, (xp, ey, yt) in enumerate(holes):
            r = f.len(0.008)
            draw.ellipse((xp - r, ey - r, xp + r, ey + r), fill=mix(spec.outline, (0, 0, 0), 0.3))
            ri = max(1, r // 2)
            draw.ellipse((xp - ri, ey - ri, xp + ri, ey + ri), fill=mix(spec.upper, (0, 0, 0), 0.55))
            # Each lace bar rises from this eyelet over the edge towards the previous one.
            if i > 0:
                pxp, _, pyt = holes[i - 1]
                top = ((xp + pxp) / 2, (yt + pyt) / 2 - f.len(0.012))
                for colour, width in ((lace_edge, lw_lace + 2 * max(1, lw // 2)), (spec.lace, lw_lace)):
                    draw.line([(xp, ey), top], fill=colour, width=width)
        # Bow at the top eyelet: two loops and two loose ends lying on the tongue.
        bx, by, _ = holes[0]
        by -= f.len(0.03)
        rl = f.len(0.022)
        for dx in (-1.0, 0.6):
            cx = bx + dx * rl
            draw.ellipse(
                (cx - rl, by - rl * 0.55, cx + rl, by + rl * 0.55), outline=lace_edge, width=lw_lace + 2
            )
            draw.ellipse((cx - rl, by - rl * 0.55, cx + rl, by + rl * 0.55), outline=spec.lace, width=lw_thin)
        for end in ((bx - f.len(0.03), by + f.len(0.07)), (bx + f.len(0.01), by + f.len(0.08))):
            draw.line([(bx, by), end], fill=lace_edge, width=lw_lace + 2)
            draw.line([(bx, by), end], fill=spec.lace, width=lw_thin)

    # --- sole
    s_curve = spline(sole_profile(spec))
    s_px = f.px(s_curve)
    s_mask = polygon_mask(f, s_px)
    s_shade = np.broadcast_to(0.86 + 0.16 * np.clip(ys / hb, 0, 1), (f.h, f.w)).astype(np.float32)
    zero = np.zeros((f.h, f.w), dtype=np.float32)
    fill_shaded(layer, s_mask, spec.sole, s_shade, zero)
    sole_dark = mix(spec.sole, (0, 0, 0), 0.45)
    if spec.article == "Sneakers":
        band = polygon_mask(f, f.px([(-0.1, -0.1), (-0.1, 0.017), (1.2, 0.017), (1.2, -0.1)]))
        fill_shaded(layer, ImageChops.darker(band, s_mask), spec.outsole, s_shade, zero)
        groove = f.px(spline([(0.02, hb * 0.55), (0.5, ts * 0.5), (0.96, ts * 0.6)], closed=False))
        draw.line(groove, fill=mix(spec.sole, (0, 0, 0), 0.18), width=max(1, lw // 2), joint="curve")
        # Tread teeth where the outsole meets the midsole.
        for k in range(28):
            x = 0.06 + 0.86 * k / 27
            draw.line(f.px([(x, 0.017), (x + 0.008, 0.028)]), fill=spec.outsole, width=max(1, lw))
    else:
        # Heel block (darker, with stacked-leather lines on loafers) and welt stitching.
        heel = polygon_mask(
            f, f.px([(-0.1, -0.1), (-0.1, hb - ts * 0.9), (0.26, hb - ts * 0.9), (0.26, -0.1)])
        )
        fill_shaded(layer, ImageChops.darker(heel, s_mask), spec.outsole, s_shade, zero)
        if spec.article == "Loafers":
            for frac in (0.33, 0.66):
                y = (hb - ts * 0.9) * frac
                draw.line(f.px([(0.0, y), (0.21, y)]), fill=sole_dark, width=max(1, lw // 2))
        # Thin rubber tread line along the forefoot underside.
        welt = f.px(
            spline(
                [(0.02, hb - ts * 0.3), (0.3, 0.5 * (hb + ts) - ts * 0.3), (0.6, ts * 0.7), (0.98, ts * 0.8)],
                closed=False,
            )
        )
        dashed(draw, welt, f.len(0.01), f.len(0.007), mix(spec.sole, WHITE, 0.35), max(1, lw // 2))
    draw.line([*s_px, s_px[0]], fill=sole_dark, width=lw, joint="curve")

    out_w, out_h = round(f.w / ss), round(f.h / ss)
    small = layer.resize((out_w, out_h), Image.Resampling.LANCZOS)
    return ImageOps.mirror(small) if spec.facing_left else small


@dataclass(frozen=True)
class Layout:
    dx: float  # centre offset, fraction of the canvas width
    dy: float  # centre offset, fraction of the canvas height
    tilt: float  # degrees; 0 for the usual flat side view
    pair: bool  # a second shoe of the pair behind the first


def random_layout(rng: random.Random, tilted: bool, pair: bool) -> Layout:
    return Layout(
        dx=rng.uniform(-0.08, 0.08),
        dy=rng.uniform(-0.08, 0.08),
        tilt=rng.uniform(2.0, 6.0) * rng.choice([-1, 1]) if tilted else 0.0,
        pair=pair,
    )


def arrange(shoe: Image.Image, spec: ShoeSpec, layout: Layout, length: float) -> Image.Image:
    """Apply the pair/tilt parts of a layout to a rendered shoe (any scale)."""
    if layout.pair:
        # The other shoe sits behind, shifted towards the toe and up, as in catalogue pair shots.
        d = -1 if spec.facing_left else 1
        dx, dy = round(d * 0.16 * length), round(0.09 * length)
        both = Image.new("RGBA", (shoe.width + abs(dx), shoe.height + dy), (0, 0, 0, 0))
        back = ImageEnhance.Brightness(shoe).enhance(0.93)  # a touch darker: further from the light
        both.alpha_composite(back, (max(dx, 0), 0))
        both.alpha_composite(shoe, (max(-dx, 0), dy))
        shoe = both
    if layout.tilt:
        shoe = shoe.rotate(layout.tilt, resample=Image.Resampling.BICUBIC, expand=True)
    return shoe


def place(group: Image.Image, size: tuple[int, int], layout: Layout, shadow: bool = True) -> Image.Image:
    """Centre the (arranged) shoe group at the layout offset, with a faint soft contact shadow."""
    w, h = size
    bx0, by0, bx1, by1 = group.getchannel("A").getbbox() or (0, 0, group.width, group.height)
    # Offset, but never so far that the shoe leaves a 3 % margin (or further off-centre than it must).
    sx, sy = max(0.0, (w * 0.94 - (bx1 - bx0)) / 2), max(0.0, (h * 0.94 - (by1 - by0)) / 2)
    cx = w / 2 + max(-sx, min(sx, layout.dx * w))
    cy = h / 2 + max(-sy, min(sy, layout.dy * h))
    ox, oy = round(cx - (bx0 + bx1) / 2), round(cy - (by0 + by1) / 2)
    canvas = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    if shadow:
        gw = bx1 - bx0
        mid, ground = ox + (bx0 + bx1) / 2, oy + by1 - 0.012 * gw
        soft = Image.new("L", (w, h), 0)
        ImageDraw.Draw(soft).ellipse(
            (mid - 0.5 * gw, ground - 0.03 * gw, mid + 0.5 * gw, ground + 0.03 * gw), fill=40
        )
        soft = soft.filter(ImageFilter.GaussianBlur(gw * 0.025))
        contact = Image.new("L", (w, h), 0)
        ImageDraw.Draw(contact).ellipse(
            (mid - 0.44 * gw, ground - 0.006 * gw, mid + 0.44 * gw, ground + 0.012 * gw), fill=60
        )
        contact = contact.filter(ImageFilter.GaussianBlur(max(1.0, gw * 0.006)))
        canvas.putalpha(ImageChops.add(soft, contact))
    placed = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    placed.paste(group, (ox, oy))  # plain paste clips safely at the canvas border
    canvas.alpha_composite(placed)
    return canvas


_DCT32 = np.array(
    [
        [math.sqrt((1 if k == 0 else 2) / 32) * math.cos(math.pi * (2 * i + 1) * k / 64) for i in range(32)]
        for k in range(32)
    ]
)


def phash_bits(img: Image.Image) -> np.ndarray:
    """Classic 64-bit DCT pHash of ``img`` padded square on white (how the cleaner sees it)."""
    side = max(img.size)
    sq = Image.new("RGB", (side, side), WHITE)
    sq.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    g = np.asarray(sq.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = np.round((_DCT32 @ g @ _DCT32.T)[:8, :8].ravel(), 6)
    return low > np.median(low)


def compose(
    spec: ShoeSpec, size: tuple[int, int], rng: random.Random, taken: list[np.ndarray] | None = None
) -> Image.Image:
    """Render one product shot on a transparent canvas.

    All shoes are side views on white, so their perceptual hashes crowd together and the cleaner
    would report unrelated photos as near-duplicates. With ``taken`` (hashes of earlier images),
    several candidate layouts are tried on a thumbnail and the one farthest from all of them wins;
    the winner's hash is appended to ``taken``.
    """
    w, h = size
    frac = rng.uniform(0.5, 0.8) if w >= h else rng.uniform(0.7, 0.85)
    length = round(w * frac)
    shoe = render_shoe(spec, length)
    # Pair shots and tilted shoes are decided up front so the hash search cannot overuse them.
    tilted = rng.random() < 0.2
    pair = rng.random() < 0.15 and length * 1.2 < w * 0.9
    candidates = [
        random_layout(rng, tilted, pair) for _ in range(LAYOUT_CANDIDATES if taken is not None else 1)
    ]
    layout = candidates[0]
    if taken is not None:
        q = 128 / max(w, h)
        thumb = shoe.resize(
            (max(1, round(shoe.width * q)), max(1, round(shoe.height * q))), Image.Resampling.BOX
        )
        tsize = (max(1, round(w * q)), max(1, round(h * q)))
        best = -1
        for cand in candidates:
            bits = phash_bits(
                on_white(place(arrange(thumb, spec, cand, length * q), tsize, cand, shadow=False))
            )
            score = min((int((bits != t).sum()) for t in taken), default=64)
            if score > best:
                best, layout, chosen = score, cand, bits
        taken.append(chosen)
    return place(arrange(shoe, spec, layout, length), size, layout)


def on_white(layer: Image.Image) -> Image.Image:
    bg = Image.new("RGBA", layer.size, (*WHITE, 255))
    bg.alpha_composite(layer)
    return bg.convert("RGB")


# --------------------------------------------------------------------------------------------
# Data set plan
# --------------------------------------------------------------------------------------------

ASPECTS = [  # (w, h, weight): mostly landscape product-shot framings
    (4, 3, 30),
    (3, 2, 22),
    (16, 10, 6),
    (5, 4, 6),
    (1, 1, 20),
    (3, 4, 10),
    (2, 3, 6),
]


@dataclass(frozen=True)
class Item:
    id: int
    spec: ShoeSpec
    size: tuple[int, int]
    kind: str  # how it is saved, see save_item
    subdir: str = ""
    quality: int = 90

    @property
    def ext(self) -> str:
        return {"gif": "gif", "webp": "webp", "webp_lossless": "webp", "webp_anim": "webp"}.get(
            self.kind, "jpg" if self.kind.startswith("jpeg") else "png"
        )

    @property
    def relpath(self) -> str:
        name = f"{self.id}.{self.ext}"
        return f"{self.subdir}/{name}" if self.subdir else name


# Special valid cases pinned to ids so data/README.md can name them.
SPECIAL: dict[int, tuple[str, str]] = {
    10007: ("png_rgba", ""),
    10031: ("png_rgba", ""),
    10058: ("png_rgba", ""),
    10015: ("png_la", ""),
    10072: ("png_la", ""),
    10023: ("png_p_transparent", ""),
    10066: ("png_p_transparent", ""),
    10019: ("jpeg_l", ""),
    10083: ("jpeg_l", ""),
    10027: ("jpeg_cmyk", ""),
    10091: ("jpeg_cmyk", ""),
    10035: ("png_i16", ""),
    10077: ("png_i16", ""),
    10042: ("jpeg_exif6", ""),
    10088: ("jpeg_exif8", ""),
    10050: ("gif", ""),
    10097: ("gif", ""),
    10062: ("webp_anim", ""),
    10095: ("webp_anim", ""),
    10044: ("webp_lossless", ""),
    10099: ("png", "extra"),
    10100: ("jpeg", "extra"),
    10005: ("jpeg", ""),  # source of the exact duplicate
    10012: ("jpeg", ""),  # source of the near duplicate
}
EXACT_DUP_OF = 10005
NEAR_DUP_OF = 10012
SIDECAR_IDS = (10010, 10060)
MALFORMED_ROW_ID = 10021  # its styles.csv row has an extra field, so it is effectively row-less


def plan(seed: int = SEED) -> list[Item]:
    rng = random.Random(seed)
    colours = [c for c, n in COLOUR_COUNTS.items() for _ in range(n)]
    assert len(colours) == N_VALID
    rng.shuffle(colours)
    items = []
    for i, colour in enumerate(colours):
        iid = FIRST_ID + i
        r = random.Random(seed * 1_000_003 + iid)  # per-image stream: editing one image moves no other
        article = r.choices(ARTICLES, weights=TYPE_WEIGHTS[colour])[0]
        spec = make_spec(r, colour, article)
        aw, ah, _ = r.choices(ASPECTS, weights=[a[2] for a in ASPECTS])[0]
        kind, subdir = SPECIAL.get(iid, ("", ""))
        if not kind:
            kind = r.choices(["jpeg", "png", "webp"], weights=[72, 12, 16])[0]
        # PNG is lossless and big: keep those frames small so the folder stays a few MB.
        lo, hi = (300, 640) if kind.startswith("png") or kind in ("gif", "webp_anim") else (320, 1200)
        long_side = round(lo + (hi - lo) * r.random() ** 1.6)
        if aw >= ah:
            size = (long_side, round(long_side * ah / aw))
        else:
            size = (round(long_side * aw / ah), long_side)
        items.append(Item(iid, spec, size, kind, subdir, quality=r.randint(85, 92)))
    return items


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def jpeg_bytes(img: Image.Image, quality: int, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True, **kw)  # Pillow writes no tIME chunk
    return buf.getvalue()


def variant_frames(item: Item, first: Image.Image) -> list[Image.Image]:
    """Frames 2-3 of an animation: the same shoe turned around, then in a sibling colour."""
    r = random.Random(item.id * 7 + 1)
    flipped = replace(item.spec, facing_left=not item.spec.facing_left)
    other = make_spec(r, "Grey" if item.spec.colour != "Grey" else "Blue", item.spec.article)
    return [
        first,
        on_white(compose(flipped, item.size, random.Random(item.id * 7 + 2))),
        on_white(compose(other, item.size, random.Random(item.id * 7 + 3))),
    ]


def encode(item: Item, layer: Image.Image) -> bytes:
    """Serialise one valid image according to its ``kind`` (see SPECIAL)."""
    rgb = on_white(layer)
    k = item.kind
    if k == "jpeg":
        return jpeg_bytes(rgb, item.quality)
    if k == "png":
        return png_bytes(rgb)
    if k == "webp":
        buf = io.BytesIO()
        rgb.save(buf, "WEBP", quality=item.quality, method=4)
        return buf.getvalue()
    if k == "webp_lossless":
        buf = io.BytesIO()
        rgb.save(buf, "WEBP", lossless=True, quality=80, method=4)
        return buf.getvalue()
    if k == "png_rgba":
        return png_bytes(layer)  # shoe + soft shadow on full transparency
    if k == "png_la":
        return png_bytes(layer.convert("LA"))
    if k == "png_p_transparent":
        # Adaptive palette of the shoe on white; fully transparent where the layer was empty.
        pal = rgb.quantize(colors=255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        idx = np.array(pal)
        idx[np.asarray(layer.getchannel("A")) < 8] = 255
        p = Image.fromarray(idx, "P")
        palette = (pal.getpalette() or [])[: 255 * 3]
        palette += [0] * (255 * 3 - len(palette)) + [255, 255, 255]
        p.putpalette(palette)
        return png_bytes(p, transparency=255)
    if k == "png_i16":
        arr = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        return png_bytes(Image.fromarray(arr))
    if k == "jpeg_l":
        return jpeg_bytes(rgb.convert("L"), item.quality)
    if k == "jpeg_cmyk":
        return jpeg_bytes(rgb.convert("CMYK"), item.quality)
    if k in ("jpeg_exif6", "jpeg_exif8"):
        # Store the pixels rotated and let the Orientation tag say how to show them upright.
        orient = 6 if k == "jpeg_exif6" else 8
        stored = rgb.transpose(Image.Transpose.ROTATE_90 if orient == 6 else Image.Transpose.ROTATE_270)
        exif = Image.Exif()
        exif[0x0112] = orient
        data = jpeg_bytes(stored, item.quality, exif=exif)
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert shown.size == rgb.size, "EXIF orientation round-trip failed"
        return data
    if k == "gif":
        frames = [
            fr.convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for fr in variant_frames(item, rgb)
        ]
        buf = io.BytesIO()
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=600, loop=0)
        return buf.getvalue()
    if k == "webp_anim":
        frames = variant_frames(item, rgb)
        buf = io.BytesIO()
        frames[0].save(
            buf, "WEBP", save_all=True, append_images=frames[1:], duration=600, loop=0, quality=85, method=4
        )
        return buf.getvalue()
    raise ValueError(f"unknown kind {k!r}")


# --------------------------------------------------------------------------------------------
# Deliberately invalid files
# --------------------------------------------------------------------------------------------


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(side: int = 30000) -> bytes:
    """A *valid* 1-bit all-white PNG declaring side x side pixels (900 Mpx) in ~150 KB.

    Streamed through zlib so neither this script nor its memory ever holds the full image.
    """
    row = b"\x00" + b"\xff" * ((side + 7) // 8)  # filter byte 0 + packed white pixels
    comp = zlib.compressobj(9)
    parts = []
    rows_per_chunk = 500
    block = row * rows_per_chunk
    for start in range(0, side, rows_per_chunk):
        n = min(rows_per_chunk, side - start)
        parts.append(comp.compress(block if n == rows_per_chunk else row * n))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def invalid_files(rendered: dict[int, Image.Image], encoded: dict[int, bytes]) -> dict[str, bytes]:
    """Files the cleaner must reject (or, for the near-duplicate, report), named for their purpose."""
    rng = random.Random(SEED + 99)
    spare = make_spec(rng, "Brown", "Casual Shoes")
    truncated_src = jpeg_bytes(on_white(compose(spare, (800, 600), rng)), 90)
    tiny_spec = make_spec(rng, "Black", "Sneakers")
    wide_spec = make_spec(rng, "Blue", "Casual Shoes")
    # Extreme aspect: a banner-like strip (8:1); the shoe is small inside it.
    wide = Image.new("RGB", (1600, 200), WHITE)
    wide_shoe = on_white(compose(wide_spec, (400, 200), rng))
    wide.paste(wide_shoe, (600, 0))
    near = rendered[NEAR_DUP_OF]
    near = near.resize((round(near.width * 0.96), round(near.height * 0.96)), Image.Resampling.LANCZOS)
    return {
        "bad_empty.jpg": b"",
        "bad_truncated.jpg": truncated_src[: len(truncated_src) // 2],
        "bad_not_an_image.png": b"This is a text file with a .png extension, not an image.\n",
        "bad_too_small.jpg": jpeg_bytes(on_white(compose(tiny_spec, (48, 40), rng)), 90),
        "bad_extreme_aspect.jpg": jpeg_bytes(wide, 90),
        "bad_decompression_bomb.png": bomb_png(),
        f"dup_exact_of_{EXACT_DUP_OF}.jpg": encoded[EXACT_DUP_OF],
        f"dup_near_of_{NEAR_DUP_OF}.jpg": jpeg_bytes(near, 72),
    }


# --------------------------------------------------------------------------------------------
# Metadata: styles.csv + sidecar captions
# --------------------------------------------------------------------------------------------


def styles_rows(items: list[Item], no_row: set[int]) -> list[str]:
    rows = []
    for it in items:
        if it.id in no_row:
            continue
        r = random.Random(it.id * 13)
        gender = r.choices(["Men", "Women", "Unisex"], weights=[6, 3, 1])[0]
        brand = r.choice(BRANDS)
        name = f"{brand} {gender} {it.spec.colour} {it.spec.article}"
        fields = [
            str(it.id),
            gender,
            "Footwear",
            "Shoes",
            it.spec.article,
            it.spec.colour,
            r.choice(SEASONS),
            str(r.randint(2011, 2018)),
            "Casual",
            name,
        ]
        if it.id == MALFORMED_ROW_ID:
            # The real Kaggle file has exactly this defect: an unquoted comma in the display name.
            fields[-1] = f"{brand} {gender} {it.spec.colour}, Tan {it.spec.article}"
        rows.append(",".join(fields))
    # Problem rows, spliced in among the good ones rather than appended, as in messy real exports.
    bad = [
        "../../etc/passwd,Men,Footwear,Shoes,Casual Shoes,Black,Fall,2012,Casual,Path Traversal Men Black Casual Shoes",
        "abc123,Women,Footwear,Shoes,Sneakers,White,Summer,2016,Casual,Streetline Women White Sneakers",
        "19001,Men,Footwear,Shoes,Casual Shoes,Brown,Winter,2014,Casual,Northwalk Men Brown Casual Shoes",
        "19002,Unisex,Footwear,Shoes,Sneakers,Blue,Spring,2017,Casual,Kestrel Unisex Blue Sneakers",
    ]
    for k, line in enumerate(bad):
        rows.insert(min(len(rows), 15 + 20 * k), line)
    return [STYLES_HEADER, *rows]


def pick_rowless(items: list[Item]) -> set[int]:
    """~10 ordinary colour images without a styles.csv row, covering the main colours, so colour
    estimation from pixels is exercised on black/brown/white/blue and a few others."""
    wanted = ["Black", "Brown", "White", "Blue", "Red", "Grey", "Navy Blue", "Beige", "Green", "White"]
    chosen: set[int] = set()
    for colour in wanted:
        for it in items:
            if (
                it.spec.colour == colour
                and it.id not in chosen
                and it.id not in SPECIAL
                and it.id not in SIDECAR_IDS
                and it.id != MALFORMED_ROW_ID
                and it.id % 3 == 1  # spread them out instead of taking the first of each colour
            ):
                chosen.add(it.id)
                break
    return chosen


def sidecar_text(it: Item) -> str:
    """A hand-written-style caption that is more specific than the template (it must win)."""
    sp = it.spec
    sole = "white" if luminance(sp.sole) > 200 else "gum" if sp.sole[0] - sp.sole[2] > 80 else "dark"
    what = {
        "Sneakers": f"low-top lace-up sneakers with {sole} rubber cupsoles",
        "Loafers": f"penny loafers with moccasin stitching and {sole} soles",
        "Casual Shoes": f"lace-up derby shoes with {sole} rubber soles",
    }[sp.article]
    return f"A professional product photo of {sp.colour.lower()} {what} on white background, side view, product photography\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def describe(path: Path) -> str:
    try:
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            return f"{im.format} {im.mode}" + (" animated" if n > 1 else "")
    except Exception:
        return "invalid"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default %(default)s)")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    items = plan()
    by_id = {it.id: it for it in items}
    rendered: dict[int, Image.Image] = {}
    encoded: dict[int, bytes] = {}
    files: dict[str, bytes] = {}
    taken: list[np.ndarray] = []  # perceptual hashes so far, to keep unrelated images apart
    for n, it in enumerate(items, 1):
        layer = compose(it.spec, it.size, random.Random(it.id * 31 + 7), taken)
        rendered[it.id] = on_white(layer)
        encoded[it.id] = encode(it, layer)
        files[it.relpath] = encoded[it.id]
        if n % 25 == 0:
            print(f"  drew {n}/{len(items)} images", file=sys.stderr)
    invalid = invalid_files(rendered, encoded)
    files.update(invalid)

    rowless = pick_rowless(items)
    files["styles.csv"] = ("\n".join(styles_rows(items, rowless)) + "\n").encode()
    for sid in SIDECAR_IDS:
        it = by_id[sid]
        files[str(Path(it.relpath).with_suffix(".txt"))] = sidecar_text(it).encode()

    # Write only our own names; anything else in --out is left alone but mentioned.
    foreign = sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and str(p.relative_to(out)) not in files
    )
    for rel, data in sorted(files.items()):
        write(out / rel, data)

    valid = {it.relpath for it in items}
    kinds = Counter(describe(out / rel) for rel in valid)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files to {out} ({total / 1e6:.2f} MB)")
    print(f"  {len(valid)} valid images by format/mode:")
    for k, n in sorted(kinds.items()):
        print(f"    {n:3d}  {k}")
    print(f"  {len(invalid)} deliberately bad/duplicate files: {', '.join(sorted(invalid))}")
    print(
        f"  styles.csv: {len(items) - len(rowless) - 1} good rows + 1 malformed ({MALFORMED_ROW_ID}) + 4 problem rows"
    )
    print(f"  images without a usable row: {sorted(rowless | {MALFORMED_ROW_ID})}")
    print(f"  sidecar captions: {', '.join(f'{i}.txt' for i in SIDECAR_IDS)}")
    if foreign:
        print(f"  note: {len(foreign)} other file(s) in {out} were left untouched: {foreign[:5]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
