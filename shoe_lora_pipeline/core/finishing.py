"""Finishing a product render for a marketplace profile, deterministically (no model, no randomness).

1. **Segment.** The background is the set of pixels within ``tolerance`` (largest channel difference) of
   the border's median colour *and connected to the border*: a mask grown from the border, never a global
   threshold, so a white sneaker on an off-white backdrop keeps every shoe pixel that differs from the
   backdrop by more than the tolerance, even where it is brighter than the backdrop. Specks (tiny
   islands) join the background. The contact shadow is the neutral (grey) region darker than the
   backdrop, at least ``SHADOW_MIN_BRIGHTNESS`` of its brightness, attached to the background and not hugging the product's silhouette (an outline or a grey
   sole edge stays product). A light-grey product part standing away from the shoe's body could still be
   taken for shadow, which is why ``publish.shadow`` defaults to ``keep``.
2. **Refuse** what finishing cannot fix honestly: a border that is not near-white at all (a scene, not a
   studio shot), a product touching the frame's edge (it would be cut), no product at all, and a product
   so small that the profile's size needs more than ``max_upscale``× resampling.
3. **Snap** the background (and the shadow with ``shadow="remove"``) to the profile's colour exactly.
4. **Frame**: crop or pad (with the profile's colour) to the profile's aspect around the product's
   bounding box so that the box fills the middle of the profile's fill range, centred; a kept shadow
   fades out before the frame's edge, so a wide shadow never shrinks the product below the range. Then resample (Lanczos) to the profile's size and snap again
   the pixels whose whole neighbourhood was background, so resampling leaves no off-white ripple.

:func:`measure` runs step 1 on a finished file: the compliance checks use it to re-measure the fill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from shoe_lora_pipeline.core.marketplace import MarketplaceProfile

ShadowMode = Literal["keep", "remove"]
DEFAULT_TOLERANCE = 12  # largest channel difference from the backdrop still counted as backdrop
DEFAULT_NEAR_WHITE = 200  # a border whose median darkest channel is below this is "not near-white at all"
SHADOW_MIN_BRIGHTNESS = 0.6  # a shadow keeps at least this share of the backdrop's brightness (a dark
# grey sole or a grey shoe does not)
SHADOW_MAX_CHROMA = 18  # … and is grey: largest minus smallest channel at most this (plus the backdrop's)
DEFAULT_MAX_UPSCALE = 6.0  # beyond this, resampling invents the detail a zoomable image is for
FINISHED_TOLERANCE = 2  # a finished background is exact; this only absorbs resampling and JPEG ripple
_SPECK_SHARE = 2e-4  # islands smaller than this share of the image are noise, not product


@dataclass
class Segmentation:
    background: np.ndarray  # bool H×W, grown from the border
    shadow: np.ndarray  # bool H×W, grey and darker than the backdrop, attached to the background
    product: np.ndarray  # bool H×W, everything else
    backdrop: tuple[int, int, int]  # the border's median colour
    border_near_white: float  # share of border pixels whose darkest channel ≥ near_white
    edge_sides: list[str]  # sides of the frame the product touches

    def bbox(self, mask: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
        """(left, top, right, bottom), right/bottom exclusive, of ``mask`` (default: the product)."""
        m = self.product if mask is None else mask
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if rows.size == 0:
            return None
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _border_ring(h: int, w: int, width: int) -> np.ndarray:
    ring = np.zeros((h, w), dtype=bool)
    ring[:width, :] = ring[-width:, :] = True
    ring[:, :width] = ring[:, -width:] = True
    return ring


def _max_abs_diff(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Largest channel difference of every pixel from ``colour`` (uint8, H×W)."""
    out = None
    for i, c in enumerate(colour):
        plane = rgb[..., i]
        d = np.maximum(plane, np.uint8(c)) - np.minimum(plane, np.uint8(c))
        out = d if out is None else np.maximum(out, d)
    assert out is not None
    return out


def _touching_border(mask: np.ndarray) -> np.ndarray:
    """The connected parts of ``mask`` (4-neighbourhood) that reach the image's outermost pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(edge)] = True
    keep[0] = False
    return keep[labels]


def segment(
    rgb: np.ndarray, *, tolerance: int = DEFAULT_TOLERANCE, near_white: int = DEFAULT_NEAR_WHITE
) -> Segmentation:
    """Background / shadow / product masks of an H×W×3 uint8 image (see the module docstring)."""
    from scipy import ndimage

    h, w = rgb.shape[:2]
    ring = _border_ring(h, w, max(1, min(h, w) // 100))
    border = rgb[ring]
    backdrop = tuple(int(v) for v in np.median(border[::3], axis=0))  # every 3rd: same median, less sorting
    near = float(np.mean(border.min(axis=1) >= near_white))
    # Per-channel work on the three planes (element-wise ufuncs; reductions over the colour axis are slow).
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    background = _touching_border(_max_abs_diff(rgb, backdrop) <= tolerance)

    # Contact shadow: grey, darker than the backdrop but not black, attached to the background.
    lum3 = r.astype(np.uint16) + g + b  # 3 × brightness
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    backdrop_lum3 = sum(backdrop)
    backdrop_chroma = max(backdrop) - min(backdrop)
    greyish = (
        ~background
        & (chroma <= SHADOW_MAX_CHROMA + backdrop_chroma)
        & (lum3 < backdrop_lum3)
        & (lum3 >= SHADOW_MIN_BRIGHTNESS * backdrop_lum3)
    )
    labels, n = ndimage.label(greyish)
    if n:
        near_background = ndimage.maximum_filter(background.view(np.uint8), size=3, mode="constant").astype(
            bool
        )
        attached = np.zeros(n + 1, dtype=bool)
        attached[np.unique(labels[near_background & greyish])] = True
        attached[0] = False
        # Grey pixels hugging the product's own silhouette (an outline, a grey sole edge) are product.
        core = ~background & ~greyish
        core |= ~core & ~_touching_border(~core)  # its holes filled
        reach = max(2, min(h, w) // 100)
        hug = ndimage.maximum_filter(core.view(np.uint8), size=2 * reach + 1).astype(bool)
        shadow = attached[labels] & ~hug
    else:
        shadow = np.zeros_like(background)

    product = ~(background | shadow)
    labels, n = ndimage.label(product)
    if n:
        sizes = np.bincount(labels.ravel())
        specks = sizes < max(4, _SPECK_SHARE * h * w)
        specks[0] = False
        speck_mask = specks[labels]
        background |= speck_mask
        product &= ~speck_mask
    sides = [
        name
        for name, line in (
            ("top", product[0]),
            ("bottom", product[-1]),
            ("left", product[:, 0]),
            ("right", product[:, -1]),
        )
        if line.any()
    ]
    return Segmentation(background, shadow, product, backdrop, near, sides)  # type: ignore[arg-type]


@dataclass
class Finished:
    image: Image.Image | None  # None when refused
    reasons: list[str] = field(default_factory=list)  # why it was refused
    fill: float | None = None  # product bbox / frame, long side, in the finished image
    upscale: float | None = None  # finished pixels per source pixel
    backdrop: tuple[int, int, int] | None = None


def _frame(product: tuple[int, int, int, int], aspect: float, fill: float) -> tuple[int, int, int, int]:
    """Integer (left, top, right, bottom), possibly outside the image, of the frame of ``aspect`` (w/h)
    in which ``product`` fills ``fill`` of the limiting side, centred on it."""
    pl, pt, pr, pb = product
    bw, bh = pr - pl, pb - pt
    fh = max(bh / fill, bw / (fill * aspect))
    fw_i, fh_i = max(1, round(fh * aspect)), max(1, round(fh))
    left, top = round((pl + pr - fw_i) / 2), round((pt + pb - fh_i) / 2)
    return left, top, left + fw_i, top + fh_i


def _place(src: Image.Image, box: tuple[int, int, int, int], fill: int | tuple[int, int, int]) -> Image.Image:
    """``src`` cropped to ``box``; parts of the box outside ``src`` are ``fill`` (crop or pad in one)."""
    from PIL import Image

    left, top, right, bottom = box
    if left >= 0 and top >= 0 and right <= src.width and bottom <= src.height:
        return src.crop(box)
    canvas = Image.new(src.mode, (right - left, bottom - top), fill)
    inner = (max(0, left), max(0, top), min(src.width, right), min(src.height, bottom))
    if inner[0] < inner[2] and inner[1] < inner[3]:
        canvas.paste(src.crop(inner), (inner[0] - left, inner[1] - top))
    return canvas


def finish(
    image: Image.Image,
    profile: MarketplaceProfile,
    *,
    shadow: ShadowMode = "keep",
    tolerance: int = DEFAULT_TOLERANCE,
    near_white: int = DEFAULT_NEAR_WHITE,
    max_upscale: float = DEFAULT_MAX_UPSCALE,
) -> Finished:
    """``image`` finished for ``profile`` (see the module docstring), or refused with the reasons."""
    from PIL import Image, ImageChops

    rgb = np.asarray(image.convert("RGB"))
    seg = segment(rgb, tolerance=tolerance, near_white=near_white)
    reasons = []
    if min(seg.backdrop) < near_white or seg.border_near_white < 0.9:
        reasons.append(
            f"border not near-white (median border colour {seg.backdrop}, {seg.border_near_white:.0%} of "
            f"border pixels have every channel ≥ {near_white})"
        )
    product_box = seg.bbox()
    if product_box is None:
        reasons.append("no product found (the image is all background)")
    if seg.edge_sides:
        reasons.append(f"product touches the {', '.join(seg.edge_sides)} edge of the frame")
    if reasons:
        return Finished(None, reasons, backdrop=seg.backdrop)
    assert product_box is not None

    colour = profile.background_rgb
    whiten = seg.background | (seg.shadow if shadow == "remove" else np.zeros_like(seg.shadow))
    snapped = rgb.copy()
    aw, ah = profile.aspect_ratio
    target_fill = (profile.fill_min + profile.fill_max) / 2
    box = _frame(product_box, aw / ah, target_fill)
    upscale = profile.target_size[0] / (box[2] - box[0])
    if upscale > max_upscale:
        return Finished(
            None,
            [
                f"needs {upscale:.1f}× upscaling to {profile.target_side} px (publish.max_upscale {max_upscale:g}): "
                "render larger (renders.hires.scale, renders.resolution) rather than invent the detail"
            ],
            backdrop=seg.backdrop,
        )
    if shadow == "keep" and seg.shadow.any():
        # The kept shadow fades out before the frame's edge (a wide shadow must not shrink the product).
        left, top, right, bottom = box
        ys, xs = np.nonzero(seg.shadow)
        inside = np.minimum.reduce([xs - left, right - 1 - xs, ys - top, bottom - 1 - ys]).astype(np.float32)
        ramp = max(2.0, 0.04 * (right - left))
        # Gone 4 source pixels before the edge: Lanczos reaches 3, so no shadow grey rings into the border.
        weight = np.clip((inside - 4) / ramp, 0.0, 1.0)
        target = np.asarray(colour, dtype=np.float32)
        snapped[ys, xs] = np.round(target - (target - snapped[ys, xs]) * weight[:, None]).astype(np.uint8)
        whiten[ys[weight == 0], xs[weight == 0]] = True
    mask = Image.fromarray(whiten.view(np.uint8) * np.uint8(255))
    src = Image.fromarray(snapped)
    src.paste(colour, mask=mask)
    framed = _place(src, box, colour)
    size = profile.target_size
    out = framed.resize(size, Image.Resampling.LANCZOS)
    # Lanczos maps a constant neighbourhood to the same constant, so the background away from the product
    # stays exactly the colour; next to the product it rings a value or two off. Snap those ringing pixels
    # (within FINISHED_TOLERANCE of the colour where any background was near, as measure() reads the
    # finished file), only in the output region around the product (Pillow's C operations).
    sx, sy = size[0] / framed.width, size[1] / framed.height
    margin = 4  # source pixels: Lanczos' reach is 3
    region = (
        max(0, int((product_box[0] - box[0] - margin) * sx)),
        max(0, int((product_box[1] - box[1] - margin) * sy)),
        min(size[0], int((product_box[2] - box[0] + margin) * sx) + 1),
        min(size[1], int((product_box[3] - box[1] + margin) * sy) + 1),
    )
    sub = out.crop(region)
    source_box = (region[0] / sx, region[1] / sy, region[2] / sx, region[3] / sy)
    near_bg = (
        _place(mask, box, 255)
        .resize(sub.size, Image.Resampling.BILINEAR, box=source_box)
        .point(lambda v: 255 if v > 0 else 0)
    )
    bands = [
        band.point(lambda v, c=c: 255 if abs(v - c) <= FINISHED_TOLERANCE else 0)
        for band, c in zip(sub.split(), colour, strict=True)
    ]
    close = ImageChops.multiply(ImageChops.multiply(bands[0], bands[1]), bands[2])  # all three: AND
    sub.paste(colour, mask=ImageChops.multiply(close, near_bg))
    out.paste(sub, region[:2])
    scale = size[0] / framed.width
    bw, bh = product_box[2] - product_box[0], product_box[3] - product_box[1]
    fill = max(bw * scale / size[0], bh * (size[1] / framed.height) / size[1])
    finished = Finished(out, [], round(fill, 4), round(scale, 4), seg.backdrop)
    if not profile.fill_min <= fill <= profile.fill_max + 1e-6:
        finished.image = None
        finished.reasons.append(
            f"product fills {fill:.2f} of the frame, outside {profile.fill_min:g}–{profile.fill_max:g}"
        )
    return finished


def measure(image: Image.Image, *, tolerance: int = FINISHED_TOLERANCE) -> tuple[float | None, Segmentation]:
    """The product's fill (bbox / frame, long side) of a finished image, and its segmentation. A finished
    background is exactly the profile's colour, hence the tiny tolerance: a near-white shoe stays product."""
    rgb = np.asarray(image.convert("RGB"))
    seg = segment(rgb, tolerance=tolerance)
    box = seg.bbox()
    if box is None:
        return None, seg
    h, w = rgb.shape[:2]
    return max((box[2] - box[0]) / w, (box[3] - box[1]) / h), seg
