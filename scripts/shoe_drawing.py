"""Drawing synthetic side-view shoe "product photos" with PIL ``ImageDraw`` + numpy (no photo is used).

Used by ``scripts/make_demo_data.py`` (the bundled demo set) and ``benchmarks/data_stage.py`` (catalogue-size
photo sets). A :class:`ShoeSpec` describes one shoe (colours, proportions, details); :func:`render_shoe`
draws it on a transparent layer; :func:`compose` places it in a product shot. Everything random comes from
the ``random.Random`` passed in, so a seed gives byte-identical images with the same Pillow build.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageOps

try:
    from shoe_lora_pipeline.core.imagehash import hamming_distance, phash
except ModuleNotFoundError:  # run as a plain script from a checkout: the package sits next to scripts/
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from shoe_lora_pipeline.core.imagehash import hamming_distance, phash

LAYOUT_CANDIDATES = 32

RGB = tuple[int, int, int]
Point = tuple[float, float]


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


@dataclass
class _Canvas:
    """One shoe being drawn: the supersampled layer plus the upper's mask and shading fields."""

    spec: ShoeSpec
    f: Frame
    layer: Image.Image
    draw: ImageDraw.ImageDraw
    lw: int  # outline width (pixels of the supersampled canvas)
    u_mask: Image.Image
    shade: np.ndarray
    hl: np.ndarray

    def __post_init__(self) -> None:
        self.mask_arr = np.asarray(self.u_mask)

    def panel(self, points: list[Point], colour: RGB) -> None:
        """A shaded panel clipped to the upper."""
        m = ImageChops.darker(polygon_mask(self.f, self.f.px(spline(points))), self.u_mask)
        fill_shaded(self.layer, m, colour, self.shade, self.hl)

    def seam(self, points: list[Point], closed: bool = False, dash: bool = True) -> None:
        """A seam line, with a row of stitches beside it unless ``dash`` is off."""
        f, spec = self.f, self.spec
        curve = f.px(spline(points, closed=closed))
        self.draw.line(curve, fill=spec.outline, width=max(1, self.lw // 2 + 1), joint="curve")
        if dash:
            sc = f.px(offset_curve(spline(points, closed=closed), -0.012))
            dashed(self.draw, sc, f.len(0.012), f.len(0.008), spec.stitch, max(1, self.lw // 2))

    def edge_y(self, x: float) -> float:
        """Height (shoe units) of the upper's top edge at x."""
        f = self.f
        return (f.y0 - top_edge(self.mask_arr, f.x0 + x * f.L)) / (f.L * f.hs)


def _upper_shading(spec: ShoeSpec, f: Frame, u_mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Rounded-looking body: a blurred-mask edge falloff, a vertical light gradient and gloss highlights."""
    xs, ys = f.grid()
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
    return shade, hl


def _draw_sneaker_details(c: _Canvas) -> None:
    """Heel counter, mudguard/toe cap, a brand-free side stripe and the eyestay."""
    spec, ts, hb = c.spec, c.spec.sole_t, c.spec.heel_t
    c.panel([(-0.1, 0.28), (0.06, 0.28), (0.16, 0.2), (0.2, hb), (-0.1, hb - 0.05)], spec.panel)
    c.seam([(0.0, 0.28), (0.06, 0.275), (0.16, 0.2), (0.2, hb + 0.005)])
    if spec.toe_cap:
        c.panel([(0.66, ts - 0.02), (0.72, 0.13), (0.85, 0.16), (1.1, 0.21), (1.1, -0.05)], spec.panel)
        c.seam([(0.67, ts + 0.005), (0.72, 0.125), (0.84, 0.153), (0.95, 0.138)])
    if spec.stripe:
        stripe = [(0.22, ts + 0.02), (0.4, 0.165), (0.6, c.edge_y(0.6) - 0.01), (0.63, c.edge_y(0.63) - 0.05)]
        stripe += [(0.43, 0.115), (0.3, ts + 0.012)]
        c.panel(stripe, spec.accent)
        c.seam(stripe, closed=True, dash=False)
    # Eyestay: the lace panel edge running down from the tongue.
    c.seam(
        [
            (0.33, c.edge_y(0.33) - 0.06),
            (0.4, c.edge_y(0.4) - 0.05),
            (0.55, c.edge_y(0.55) - 0.05),
            (0.7, c.edge_y(0.7) - 0.03),
        ]
    )


def _draw_loafer_details(c: _Canvas) -> None:
    """Moc-toe apron seam (raised: dark line + stitches) and a penny strap across the saddle."""
    spec, f, ts, hb = c.spec, c.f, c.spec.sole_t, c.spec.heel_t
    apron = [(0.4, c.edge_y(0.4) - 0.025), (0.6, c.edge_y(0.6) - 0.05), (0.8, c.edge_y(0.8) - 0.05)]
    apron += [(0.93, c.edge_y(0.93) - 0.045), (0.99, ts + 0.03)]
    c.seam(apron)
    y0, y1 = c.edge_y(0.34) - 0.012, c.edge_y(0.56) - 0.014
    strap = [(0.33, y0), (0.45, 0.5 * (y0 + y1) + 0.004), (0.57, y1), (0.57, y1 - 0.042)]
    strap += [(0.45, 0.5 * (y0 + y1) - 0.04), (0.33, y0 - 0.045)]
    c.panel(strap, mix(spec.upper, (0, 0, 0), 0.12))
    c.seam(strap, closed=True, dash=False)
    sx, sy = 0.45, 0.5 * (y0 + y1) - 0.018  # the "penny" slot
    slot = f.px([(sx - 0.04, sy + 0.002), (sx + 0.04, sy - 0.002)])
    c.draw.line(slot, fill=mix(spec.upper, (0, 0, 0), 0.65), width=f.len(0.012))
    c.panel([(-0.1, 0.21), (0.05, 0.21), (0.14, 0.15), (0.17, hb), (-0.1, hb - 0.05)], spec.panel)
    c.seam([(0.0, 0.21), (0.05, 0.206), (0.14, 0.15), (0.17, hb + 0.005)])


def _draw_derby_details(c: _Canvas) -> None:
    """Heel counter, the derby quarter seam from the collar down to the sole, an optional toe cap."""
    spec, ts, hb = c.spec, c.spec.sole_t, c.spec.heel_t
    c.panel([(-0.1, 0.25), (0.05, 0.245), (0.15, 0.17), (0.19, hb), (-0.1, hb - 0.05)], spec.panel)
    c.seam([(0.0, 0.25), (0.05, 0.245), (0.15, 0.17), (0.19, hb + 0.005)])
    c.seam([(0.31, c.edge_y(0.31) - 0.06), (0.37, 0.2), (0.4, 0.13), (0.42, ts + 0.01)])
    if spec.toe_cap:
        c.seam([(0.76, ts + 0.005), (0.78, 0.12), (0.83, c.edge_y(0.83) - 0.005)])


def _draw_laces(c: _Canvas) -> None:
    """Eyelets along the throat, lace bars zig-zagging over the top edge, a small bow."""
    spec, f, draw, lw = c.spec, c.f, c.draw, c.lw
    xa, xb = (0.385, 0.64) if spec.article == "Sneakers" else (0.365, 0.58)
    lw_lace = f.len(0.014)
    lw_thin = max(1, lw_lace - 1)
    lace_edge = mix(spec.lace, (0, 0, 0), 0.4)
    holes = []
    for i in range(spec.eyelets):
        x = xa + (xb - xa) * i / max(1, spec.eyelets - 1)
        xp = f.x0 + x * f.L
        yt = top_edge(c.mask_arr, xp)
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
        draw.ellipse((cx - rl, by - rl * 0.55, cx + rl, by + rl * 0.55), outline=lace_edge, width=lw_lace + 2)
        draw.ellipse((cx - rl, by - rl * 0.55, cx + rl, by + rl * 0.55), outline=spec.lace, width=lw_thin)
    for end in ((bx - f.len(0.03), by + f.len(0.07)), (bx + f.len(0.01), by + f.len(0.08))):
        draw.line([(bx, by), end], fill=lace_edge, width=lw_lace + 2)
        draw.line([(bx, by), end], fill=spec.lace, width=lw_thin)


def _draw_sole(c: _Canvas) -> None:
    """The sole: shaded body, tread band and teeth (sneakers) or heel block and welt stitching."""
    spec, f, draw, lw = c.spec, c.f, c.draw, c.lw
    ts, hb = spec.sole_t, spec.heel_t
    _, ys = f.grid()
    s_px = f.px(spline(sole_profile(spec)))
    s_mask = polygon_mask(f, s_px)
    s_shade = np.broadcast_to(0.86 + 0.16 * np.clip(ys / hb, 0, 1), (f.h, f.w)).astype(np.float32)
    zero = np.zeros((f.h, f.w), dtype=np.float32)
    fill_shaded(c.layer, s_mask, spec.sole, s_shade, zero)
    sole_dark = mix(spec.sole, (0, 0, 0), 0.45)
    if spec.article == "Sneakers":
        band = polygon_mask(f, f.px([(-0.1, -0.1), (-0.1, 0.017), (1.2, 0.017), (1.2, -0.1)]))
        fill_shaded(c.layer, ImageChops.darker(band, s_mask), spec.outsole, s_shade, zero)
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
        fill_shaded(c.layer, ImageChops.darker(heel, s_mask), spec.outsole, s_shade, zero)
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


def render_shoe(spec: ShoeSpec, length_px: int) -> Image.Image:
    """Draw one shoe on a transparent layer.

    The layer is already downsampled: the shoe is about ``length_px`` long.
    """
    ss = 3 if length_px <= 520 else 2  # supersampling = anti-aliasing for ImageDraw shapes
    f = Frame(length_px * ss, spec)
    layer = Image.new("RGBA", (f.w, f.h), (0, 0, 0, 0))
    u_pts, (c0, c1) = upper_profile(spec)
    n_per = 20
    u_curve = spline(u_pts, samples=n_per)
    u_px = f.px(u_curve)
    u_mask = polygon_mask(f, u_px)
    shade, hl = _upper_shading(spec, f, u_mask)
    fill_shaded(layer, u_mask, spec.upper, shade, hl)
    c = _Canvas(spec, f, layer, ImageDraw.Draw(layer), f.len(0.0035), u_mask, shade, hl)

    if spec.article != "Loafers":
        # Tongue: a separate, slightly different-toned panel poking out above the throat.
        tongue = [(0.27, 0.6), (0.42, 0.6), (0.4, c.edge_y(0.4) - 0.02), (0.3, c.edge_y(0.3) - 0.05)]
        c.panel(tongue, mix(spec.upper, WHITE if luminance(spec.upper) < 90 else (0, 0, 0), 0.1))
        c.seam(tongue[2:], dash=False)
    details = {"Sneakers": _draw_sneaker_details, "Loafers": _draw_loafer_details}
    details.get(spec.article, _draw_derby_details)(c)

    # Collar: padded opening rendered as a thick, darker lining edge; then the upper's outline.
    collar_curve = u_curve[c0 * n_per : c1 * n_per + 1]
    lining = mix(spec.upper, (0, 0, 0), 0.5) if luminance(spec.upper) > 70 else (70, 62, 56)
    c.draw.line(f.px(collar_curve), fill=lining, width=f.len(0.012), joint="curve")
    c.draw.line([*u_px, u_px[0]], fill=spec.outline, width=c.lw, joint="curve")
    if spec.article != "Loafers":
        _draw_laces(c)
    _draw_sole(c)

    out_w, out_h = round(f.w / ss), round(f.h / ss)
    small = layer.resize((out_w, out_h), Image.Resampling.LANCZOS)
    return ImageOps.mirror(small) if spec.facing_left else small


# --------------------------------------------------------------------------------------------
# Product shot: placement, pair/tilt, contact shadow
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShotLayout:
    dx: float  # centre offset, fraction of the canvas width
    dy: float  # centre offset, fraction of the canvas height
    tilt: float  # degrees; 0 for the usual flat side view
    pair: bool  # a second shoe of the pair behind the first


def random_layout(rng: random.Random, tilted: bool, pair: bool) -> ShotLayout:
    return ShotLayout(
        dx=rng.uniform(-0.08, 0.08),
        dy=rng.uniform(-0.08, 0.08),
        tilt=rng.uniform(2.0, 6.0) * rng.choice([-1, 1]) if tilted else 0.0,
        pair=pair,
    )


def arrange(shoe: Image.Image, spec: ShoeSpec, layout: ShotLayout, length: float) -> Image.Image:
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


def place(group: Image.Image, size: tuple[int, int], layout: ShotLayout, shadow: bool = True) -> Image.Image:
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


def padded_phash(img: Image.Image) -> int:
    """The cleaner's 64-bit DCT pHash of ``img`` padded square on white (how the cleaner sees it)."""
    side = max(img.size)
    sq = Image.new("RGB", (side, side), WHITE)
    sq.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return phash(sq)


def compose(
    spec: ShoeSpec,
    size: tuple[int, int],
    rng: random.Random,
    taken: list[int] | None = None,
    shadow: bool = True,
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
            bits = padded_phash(
                on_white(place(arrange(thumb, spec, cand, length * q), tsize, cand, shadow=False))
            )
            score = min((hamming_distance(bits, t) for t in taken), default=64)
            if score > best:
                best, layout, chosen = score, cand, bits
        taken.append(chosen)
    return place(arrange(shoe, spec, layout, length), size, layout, shadow=shadow)


def on_white(layer: Image.Image) -> Image.Image:
    bg = Image.new("RGBA", layer.size, (*WHITE, 255))
    bg.alpha_composite(layer)
    return bg.convert("RGB")


# --------------------------------------------------------------------------------------------
# Pretraining shots for the tiny-shoes demo base model: many colours, types, views, backgrounds
# --------------------------------------------------------------------------------------------

# Colours beyond the demo catalogue's nine, so the base model learns colour words as a family.
PRETRAIN_SHADES: dict[str, list[RGB]] = {
    **UPPER_SHADES,
    "Tan": [(190, 140, 90), (178, 128, 80)],
    "Yellow": [(226, 196, 48), (214, 184, 40)],
    "Orange": [(230, 118, 34), (214, 104, 30)],
    "Pink": [(232, 150, 178), (220, 136, 166)],
    "Purple": [(110, 52, 130), (96, 44, 118)],
}
# Caption phrase per drawn article ("{colour} {phrase}" as in the recipe's validation prompts).
TYPE_PHRASES: dict[str, tuple[str, ...]] = {
    "Casual Shoes": ("casual shoes", "leather casual shoes"),
    "Sneakers": ("casual sneakers", "sneakers"),
    "Loafers": ("loafers", "leather loafers"),
}
# The characteristics word each drawn article shows (laces drawn on casual shoes and sneakers, none on
# loafers), in the words of the specs sheets' "characteristics" column (data/casual_shoes/specs.csv:
# lace-up, slip-on). The render prompts put it after the view ("..., side view, lace-up, ..."); a word the
# pretraining captions never used would be an unknown token to the UNet's cross-attention, and the
# renders of such SKUs came out in the wrong colour. A slip-on "casual shoe" is drawn as a loafer.
CHARACTERISTICS: dict[str, str] = {"Casual Shoes": "lace-up", "Sneakers": "lace-up", "Loafers": "slip-on"}
# Backgrounds of the pretraining set: most are NOT white, so the base model's "on white background"
# is unreliable (what the demo LoRA, trained on white-background photos, has to fix).
BACKGROUND_KINDS = ("white", "light grey", "grey", "beige", "gradient", "dark")
BACKGROUND_WEIGHTS = (0.25, 0.2, 0.15, 0.15, 0.17, 0.08)


def background(rng: random.Random, size: tuple[int, int], kind: str) -> Image.Image:
    """A studio backdrop: flat white/grey/beige, a vertical sweep gradient or a dark grey.

    Every non-white kind keeps at least one channel below 235 everywhere, so none of them reads as
    white to the product QA's near-white rule.
    """
    w, h = size
    if kind == "white":
        return Image.new("RGB", size, WHITE)
    if kind == "light grey":
        g = rng.randint(196, 222)
        return Image.new("RGB", size, (g, g, min(255, g + rng.randint(0, 4))))
    if kind == "grey":
        g = rng.randint(130, 190)
        return Image.new("RGB", size, (g, g, g + rng.randint(0, 6)))
    if kind == "beige":
        return Image.new("RGB", size, mix((236, 222, 196), (210, 190, 158), rng.random()))
    if kind == "dark":
        g = rng.randint(50, 90)
        return Image.new("RGB", size, (g, g, g))
    top = rng.choice([(250, 250, 250), (232, 226, 214), (224, 226, 230)])
    bottom = rng.choice([(150, 152, 156), (196, 186, 166), (176, 178, 184)])
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    col = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    arr = np.broadcast_to(col, (h, w, 3)).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


@dataclass(frozen=True)
class PretrainShot:
    image: Image.Image
    caption: str
    colour: str
    article: str
    background: str
    shadow: bool


def pretraining_shot(rng: random.Random, side: int) -> PretrainShot:
    """One square product shot with its caption in the recipe's template (all randomness from ``rng``).

    The caption always says "on white background" (the template's wording), whatever the backdrop.
    """
    colour = rng.choice(sorted(PRETRAIN_SHADES))
    article = rng.choice(ARTICLES)
    base = make_spec(rng, colour if colour in UPPER_SHADES else "Brown", article)
    spec = dataclasses.replace(base, colour=colour, upper=rng.choice(PRETRAIN_SHADES[colour]))
    if colour not in UPPER_SHADES:
        spec = dataclasses.replace(
            spec,
            outline=mix(spec.upper, (0, 0, 0), 0.55),
            panel=mix(spec.upper, (0, 0, 0), 0.12),
            lace=mix(spec.upper, (0, 0, 0), 0.25),
            stitch=mix(spec.upper, (0, 0, 0), 0.3),
        )
    kind = rng.choices(BACKGROUND_KINDS, BACKGROUND_WEIGHTS)[0]
    shadow = rng.random() < 0.6
    # Draw at 2x and downsample: the shoe's thin details survive as shading instead of aliasing.
    big = (side * 2, side * 2)
    layer = compose(spec, big, rng, shadow=shadow)
    img = background(rng, big, kind).convert("RGBA")
    img.alpha_composite(layer)
    img = img.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    phrase = rng.choice(TYPE_PHRASES[article])
    view = "side view"
    if rng.random() < 0.3:
        view = rng.choice(
            [
                "side view, facing left" if spec.facing_left else "side view, facing right",
                "single shoe, side view",
                "studio lighting, side view",
            ]
        )
    # The characteristics slot as the render prompts fill it (core/renders/specs.py): "view,
    # characteristics", the characteristics alone when a spec row has no view, or the view alone.
    trait = CHARACTERISTICS[article]
    if article == "Loafers" and rng.random() < 0.5:
        phrase = rng.choice(TYPE_PHRASES["Casual Shoes"])  # "brown leather casual shoes, slip-on"
        slot = rng.choice([f"side view, {trait}", trait])
    else:
        slot = rng.choices([view, f"side view, {trait}", trait], [0.5, 0.3, 0.2])[0]
    caption = (
        f"A professional product photo of {colour.lower()} {phrase} on white background, "
        f"{slot}, product photography"
    )
    return PretrainShot(img, caption, colour.lower(), article, kind, shadow)
