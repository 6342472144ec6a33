"""Weight-free product-photo QA (numpy / PIL / scipy only): does a generation look like a catalogue shot?

Every per-image check returns a :class:`QAValue` ``(value, passed, details)``; ``passed`` is ``None`` when
the check cannot be assessed for that image (e.g. a prompt without a colour word), and such images are left
out of that check's share. Definitions (all measured on a copy downscaled to at most ``ANALYSIS_SIDE`` px,
so results do not depend on the generation resolution and JPEG/diffusion noise is averaged out):

* **near-white** pixel: all three channels >= ``NEAR_WHITE_MIN`` (235).
* **white background**: share of near-white pixels in the outer ``BORDER_FRACTION`` (4 %) band of each
  edge; pass when >= ``WHITE_BORDER_MIN`` (0.90).
* **backdrop**: a plane (per channel: a + b·x + c·y, so flat backdrops and sweep gradients both fit) fitted
  to the border band by least squares. The backdrop is **plain** when the 80th percentile of the border
  pixels' RGB distance from the plane is <= ``BACKDROP_RESIDUAL_MAX``; noise or clutter has no plain
  backdrop, and then every geometric check below fails with that reason (a frame-filling "object" is not a
  product shot). **Foreground** = pixels farther than ``FOREGROUND_DISTANCE`` from the fitted backdrop, so
  a shoe on grey or beige is measured as well as one on white, and a flat image has no foreground.
* **significant components**: 8-connected components of the foreground after a small closing (bridges
  gaps < ~1.5 % of the side, e.g. anti-aliased laces); a component is a *speck* and ignored when it is
  smaller than ``MIN_COMPONENT_FRACTION`` (0.2 %) of the frame or than ``MIN_COMPONENT_RELATIVE`` (5 %) of
  the largest component. Contact shadows touch the shoe and join its component.
* **centred**: bounding box of the significant components; offset = max(|dx|, |dy|) of its centre from the
  image centre, each as a fraction of that side; pass when <= ``CENTRE_OFFSET_MAX`` (0.10). No foreground
  fails with a reason (blank image, or a white product lost on white).
* **single object**: exactly one significant component. A *pair* of shoes passes only when the two shoes
  touch or overlap (they are then one component); two separate shoes count as two objects.
* **fill**: the product's bounding box, its longer side as a fraction of that image side; pass in
  [``FILL_MIN``, ``FILL_MAX``] (0.3–0.95: a product neither lost in the frame nor cut by it). Its details
  carry the box's aspect (width / height); a **shoe-shaped** object (side view) is wider than tall,
  ``SHOE_ASPECT_RANGE`` (1.2–4).
* **sharpness**: variance of the 3x3 Laplacian of the grey image over the foreground dilated by 2 px (so
  the silhouette edge counts); pass when >= ``SHARPNESS_MIN``. Informational, not in the checklist.
* **colour adherence**: the colour word(s) of the prompt (the captions module's vocabulary; "white
  background" phrases are removed first) vs the product's colour: the median of the significant
  components' foreground pixels in the top 70 % of their box (the upper of a side view, not its sole or
  contact shadow; any plain backdrop), else :func:`captions.estimate_colour`. Pass when the measured palette name is one of the prompt's colours, or
  the CIE76 ΔE from the foreground median to the nearest palette prototype of a prompt colour is <=
  ``COLOUR_DELTA_E_MAX`` (15). Colour words without palette prototypes map to the nearest palette names
  (``COLOUR_ALIASES``); words with none (multicolour, metallic) are not scored.
* **diversity**: mean pairwise pHash Hamming distance among one prompt's images (64-bit DCT pHash of
  :mod:`imagehash`); below ``thresholds.diversity_min_hamming`` = mode collapse.
* **memorisation**: per generation, the nearest training image by pHash; flagged when the distance is <=
  ``MEMORISATION_MAX_DISTANCE`` (4 of 64 bits: a near-copy). pHash sees grey-level structure only, so a
  recoloured copy of a training photo also counts (intended: it is still a copied composition). On the
  demo data distinct training photos are >= 6 bits apart and the planted near-duplicate is at 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shoe_lora_pipeline.core import captions
from shoe_lora_pipeline.core.colour import PALETTE_LAB, PALETTE_NAMES, nearest_colour_name
from shoe_lora_pipeline.core.imagehash import hamming_to_set, pairwise_hamming, phash, phash_hex

ANALYSIS_SIDE = 256
NEAR_WHITE_MIN = 235
BORDER_FRACTION = 0.04
WHITE_BORDER_MIN = 0.90
CENTRE_OFFSET_MAX = 0.10
MIN_COMPONENT_FRACTION = 0.002
MIN_COMPONENT_RELATIVE = 0.05
CLOSING_FRACTION = 0.015
SHARPNESS_MIN = 100.0
COLOUR_DELTA_E_MAX = 15.0
MEMORISATION_MAX_DISTANCE = 4
BACKDROP_RESIDUAL_MAX = 12.0
BACKDROP_PERCENTILE = 80
FOREGROUND_DISTANCE = 24.0
FILL_MIN = 0.3
FILL_MAX = 0.95
SHOE_ASPECT_RANGE = (1.2, 4.0)

# Caption colour words that have no prototype in captions.COLOUR_PALETTE -> the palette names they may
# legitimately be measured as. Words absent here and from the palette (multicolour, metallic) are not scored.
COLOUR_ALIASES: dict[str, tuple[str, ...]] = {
    "off-white": ("white", "beige"),
    "charcoal": ("grey", "black"),
    "silver": ("grey", "white"),
    "bronze": ("brown", "tan"),
    "copper": ("brown", "orange", "tan"),
    "khaki": ("beige", "tan", "green"),
    "taupe": ("beige", "grey", "brown"),
    "turquoise": ("blue", "green"),
    "teal": ("blue", "green"),
    "maroon": ("red", "brown", "purple"),
    "burgundy": ("red", "purple", "brown"),
    "rust": ("orange", "brown", "red"),
    "olive": ("green", "brown"),
    "mustard": ("yellow", "orange", "tan"),
    "gold": ("yellow", "tan", "beige"),
    "peach": ("pink", "orange", "beige"),
    "magenta": ("pink", "purple"),
    "lavender": ("purple", "pink"),
    "mauve": ("purple", "pink"),
}
# "on white background", "on a pure white backdrop", "white studio background": not the product's colour.
_BACKGROUND_PHRASE = re.compile(
    r"\b(?:on\s+(?:a\s+)?)?(?:pure\s+|plain\s+|clean\s+|seamless\s+)?white\s+"
    r"(?:studio\s+)?(?:background|backdrop|studio|sweep)\b",
    re.IGNORECASE,
)


def _colour_vocabulary() -> list[tuple[re.Pattern[str], str]]:
    """(pattern, canonical colour word) from the captions vocabulary, longest phrase first."""
    words: dict[str, str] = {}
    for raw, canonical in captions.COLOUR_WORDS.items():
        words[raw] = canonical
        words[canonical] = canonical
    for name in PALETTE_NAMES:
        words.setdefault(name, name)
    words.pop("multi", None)
    ordered = sorted(words.items(), key=lambda kv: (-len(kv[0]), kv[0]))
    return [
        (re.compile(r"(?<![\w-])" + re.escape(w).replace(r"\ ", r"[\s-]+") + r"(?![\w-])", re.I), c)
        for w, c in ordered
    ]


_COLOUR_PATTERNS = _colour_vocabulary()


@dataclass
class QAValue:
    """One check on one image (or one prompt): a number, pass/fail (None = not assessable), why."""

    value: float | None
    passed: bool | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "passed": self.passed, "details": self.details}


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def _as_array(image: Image.Image) -> np.ndarray:
    img = image.convert("RGB")
    if max(img.size) > ANALYSIS_SIDE:
        img = img.copy()
        img.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def _border_band(h: int, w: int) -> int:
    return max(1, round(BORDER_FRACTION * min(h, w)))


def near_white_mask(arr: np.ndarray) -> np.ndarray:
    """True where all channels are >= NEAR_WHITE_MIN."""
    return np.all(arr >= NEAR_WHITE_MIN, axis=-1)


@dataclass(frozen=True)
class Backdrop:
    """The fitted backdrop of an analysis copy: per-pixel colour, whether it is plain, and how plain."""

    colour: np.ndarray  # (h, w, 3) float
    plain: bool
    residual: float  # BACKDROP_PERCENTILE-th percentile of the border's distance from the fit
    median_rgb: list[int]

    def reason(self) -> str:
        return (
            f"no plain backdrop: the border varies by {self.residual:.0f} RGB units around its best flat or "
            f"gradient fit (limit {BACKDROP_RESIDUAL_MAX:.0f}): noise or clutter, not a product shot"
        )


def fit_backdrop(arr: np.ndarray) -> Backdrop:
    """Least-squares plane per channel through the border band (see the module doc)."""
    h, w = arr.shape[:2]
    b = _border_band(h, w)
    ring = np.ones((h, w), dtype=bool)
    if h > 2 * b and w > 2 * b:
        ring[b:-b, b:-b] = False
    ys, xs = np.nonzero(ring)
    design = np.stack([np.ones_like(xs), xs / w, ys / h], axis=1).astype(np.float64)
    pixels = arr[ring].astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    residual = float(np.percentile(np.linalg.norm(pixels - design @ coef, axis=1), BACKDROP_PERCENTILE))
    gy, gx = np.mgrid[0:h, 0:w]
    grid = np.stack([np.ones((h, w)), gx / w, gy / h], axis=-1)
    return Backdrop(
        colour=grid @ coef,
        plain=residual <= BACKDROP_RESIDUAL_MAX,
        residual=round(residual, 2),
        median_rgb=[int(v) for v in np.median(pixels, axis=0)],
    )


def foreground_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Product pixels of the analysis copy: farther than FOREGROUND_DISTANCE from the fitted backdrop.

    Without a plain backdrop (noise, clutter) every pixel differs from it: the whole frame is returned,
    and the geometric checks fail on :attr:`Backdrop.plain` before they look at it.
    """
    arr = image if isinstance(image, np.ndarray) else _as_array(image)
    backdrop = fit_backdrop(arr)
    return np.linalg.norm(arr.astype(np.float64) - backdrop.colour, axis=-1) > FOREGROUND_DISTANCE


@dataclass(frozen=True)
class Product:
    """The product as the geometric checks see it: backdrop, significant components, their pixels."""

    backdrop: Backdrop
    n_components: int
    areas: list[int]
    mask: np.ndarray  # foreground pixels of the significant components
    shape: tuple[int, int]

    def bbox(self) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def failure(self) -> str | None:
        """Why no geometric check can pass (None when there is a product to measure)."""
        if not self.backdrop.plain:
            return self.backdrop.reason()
        if not self.n_components:
            return "no foreground: blank image or a white product on white"
        return None


def find_product(image: Image.Image | np.ndarray) -> Product:
    arr = image if isinstance(image, np.ndarray) else _as_array(image)
    fg = foreground_mask(arr)
    labels, keep, areas = significant_components(fg)
    return Product(
        backdrop=fit_backdrop(arr),
        n_components=len(keep),
        areas=areas,
        mask=np.isin(labels, keep) & fg,
        shape=fg.shape,
    )


def significant_components(mask: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """(label image, labels of significant components, their areas), largest first; specks dropped."""
    from scipy import ndimage

    h, w = mask.shape
    k = max(3, int(round(CLOSING_FRACTION * min(h, w))) | 1)
    # Padding keeps the closing from eroding objects that touch the frame.
    pad = k
    padded = np.pad(mask, pad)
    closed = ndimage.binary_closing(padded, structure=np.ones((k, k), dtype=bool))[pad:-pad, pad:-pad]
    closed |= mask
    labels, n = ndimage.label(closed, structure=np.ones((3, 3), dtype=int))
    if n == 0:
        return labels, [], []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    largest = int(areas.max())
    min_area = max(MIN_COMPONENT_FRACTION * h * w, MIN_COMPONENT_RELATIVE * largest)
    keep = [(int(a), i + 1) for i, a in enumerate(areas) if a >= min_area]
    keep.sort(key=lambda t: (-t[0], t[1]))
    return labels, [lab for _, lab in keep], [a for a, _ in keep]


def white_background(image: Image.Image) -> QAValue:
    """Share of near-white pixels in the outer border band; pass >= WHITE_BORDER_MIN."""
    arr = _as_array(image)
    h, w = arr.shape[:2]
    b = _border_band(h, w)
    ring = np.ones((h, w), dtype=bool)
    ring[b:-b, b:-b] = False
    pixels = arr[ring]
    ratio = float(near_white_mask(pixels).mean())
    return QAValue(
        round(ratio, 4),
        ratio >= WHITE_BORDER_MIN,
        {
            "border_px": b,
            "border_fraction": BORDER_FRACTION,
            "near_white_min": NEAR_WHITE_MIN,
            "border_median_rgb": [int(v) for v in np.median(pixels, axis=0)],
            "threshold": WHITE_BORDER_MIN,
        },
    )


def centring(image: Image.Image) -> QAValue:
    """Offset of the product's bounding-box centre from the image centre (fraction of the side)."""
    product = find_product(image)
    h, w = product.shape
    failure = product.failure()
    if failure:
        return QAValue(None, False, {"reason": failure})
    x0, y0, x1, y1 = product.bbox()
    ys, xs = np.nonzero(product.mask)
    dx = ((x0 + x1) / 2 - w / 2) / w
    dy = ((y0 + y1) / 2 - h / 2) / h
    offset = max(abs(dx), abs(dy))
    return QAValue(
        round(offset, 4),
        offset <= CENTRE_OFFSET_MAX,
        {
            "dx": round(dx, 4),
            "dy": round(dy, 4),
            "bbox_xyxy_fraction": [round(x0 / w, 4), round(y0 / h, 4), round(x1 / w, 4), round(y1 / h, 4)],
            "mass_centroid_fraction": [round(float(xs.mean()) / w, 4), round(float(ys.mean()) / h, 4)],
            "foreground_fraction": round(float(product.mask.mean()), 4),
            "threshold": CENTRE_OFFSET_MAX,
        },
    )


def single_object(image: Image.Image) -> QAValue:
    """Number of significant foreground components; pass when exactly one (on a plain backdrop)."""
    product = find_product(image)
    h, w = product.shape
    details: dict[str, Any] = {"component_area_fractions": [round(a / (h * w), 4) for a in product.areas]}
    failure = product.failure()
    if failure:
        details["reason"] = failure
        return QAValue(float(product.n_components) if product.backdrop.plain else None, False, details)
    return QAValue(float(product.n_components), product.n_components == 1, details)


def fill(image: Image.Image) -> QAValue:
    """How much of the frame the product spans: its box's longer side as a fraction of that image side."""
    product = find_product(image)
    h, w = product.shape
    failure = product.failure()
    if failure:
        return QAValue(None, False, {"reason": failure})
    x0, y0, x1, y1 = product.bbox()
    value = max((x1 - x0) / w, (y1 - y0) / h)
    aspect = (x1 - x0) / max(1, y1 - y0)
    return QAValue(
        round(value, 4),
        FILL_MIN <= value <= FILL_MAX,
        {
            "range": [FILL_MIN, FILL_MAX],
            "bbox_aspect": round(aspect, 3),
            "shoe_shaped": SHOE_ASPECT_RANGE[0] <= aspect <= SHOE_ASPECT_RANGE[1],
            "shoe_aspect_range": list(SHOE_ASPECT_RANGE),
        },
    )


def sharpness(image: Image.Image) -> QAValue:
    """Variance of the Laplacian over the (dilated) foreground; higher = sharper."""
    from scipy import ndimage

    arr = _as_array(image)
    product = find_product(arr)
    failure = product.failure()
    if failure:
        return QAValue(None, False, {"reason": failure})
    fg = product.mask
    grey = np.asarray(Image.fromarray(arr).convert("L"), dtype=np.float64)
    lap = ndimage.laplace(grey)
    region = ndimage.binary_dilation(fg, iterations=2)
    value = float(lap[region].var())
    return QAValue(round(value, 2), value >= SHARPNESS_MIN, {"threshold": SHARPNESS_MIN})


# ----------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------


def prompt_colours(prompt: str) -> list[str]:
    """Canonical colour words of the product in ``prompt`` (background phrases removed), in order."""
    text = _BACKGROUND_PHRASE.sub(" ", prompt)
    found: list[tuple[int, str]] = []
    taken = np.zeros(len(text) + 1, dtype=bool)
    for pattern, canonical in _COLOUR_PATTERNS:  # longest phrases first, so "navy blue" beats "blue"
        for m in pattern.finditer(text):
            if taken[m.start() : m.end()].any():
                continue
            taken[m.start() : m.end()] = True
            found.append((m.start(), canonical))
    out: list[str] = []
    for _, c in sorted(found):
        if c not in out:
            out.append(c)
    return out


def _palette_names_for(colour: str) -> tuple[str, ...]:
    if colour in PALETTE_NAMES:
        return (colour,)
    return COLOUR_ALIASES.get(colour, ())


def _product_colour(image: Image.Image) -> tuple[str, dict[str, Any]]:
    """(palette name, {median_rgb, confidence}) of the product's pixels on any plain backdrop.

    Falls back to :func:`captions.estimate_colour` (which assumes white around the shoe) when there is no
    product to measure, e.g. a white shoe lost on white.
    """
    product = find_product(image)
    if product.failure():
        return captions.estimate_colour(image)
    arr = _as_array(image)
    # The upper, not the sole or the contact shadow: the top 70 % of the product's box (side views).
    x0, y0, x1, y1 = product.bbox()
    upper = product.mask.copy()
    upper[y0 + max(1, round(0.7 * (y1 - y0))) :] = False
    median = np.median(arr[upper].astype(np.float64), axis=0)
    name, delta, runner_up, runner_delta = nearest_colour_name(median)
    confidence = "high" if runner_delta - delta > 5 else "low"
    return name, {"median_rgb": [int(round(v)) for v in median], "confidence": confidence}


def colour_adherence(image: Image.Image, prompt: str) -> QAValue:
    """ΔE76 between the product's median colour and the prompt colour; see the module doc for the rule."""
    wanted = prompt_colours(prompt)
    scorable = {c: _palette_names_for(c) for c in wanted if _palette_names_for(c)}
    measured, est = _product_colour(image)
    details: dict[str, Any] = {
        "prompt_colours": wanted,
        "measured": measured,
        "measured_median_rgb": est.get("median_rgb"),
        "confidence": est.get("confidence"),
        "threshold_delta_e": COLOUR_DELTA_E_MAX,
    }
    if not scorable:
        details["reason"] = (
            "prompt names no colour" if not wanted else f"colour word(s) {wanted} have no palette reference"
        )
        return QAValue(None, None, details)
    accepted = sorted({n for names in scorable.values() for n in names})
    details["accepted_palette_names"] = accepted
    median = est.get("median_rgb")
    if median is None:
        # No foreground: estimate_colour calls it white (white shoe on white); no ΔE to report.
        details["reason"] = "no foreground measured"
        return QAValue(None, measured in accepted, details)
    lab = captions.srgb_to_lab(np.asarray(median, dtype=np.float64))
    idx = [i for i, n in enumerate(PALETTE_NAMES) if n in accepted]
    d = np.linalg.norm(PALETTE_LAB[idx] - lab, axis=1)
    delta_e = float(d.min())
    details["nearest_prompt_prototype"] = PALETTE_NAMES[idx[int(d.argmin())]]
    passed = measured in accepted or delta_e <= COLOUR_DELTA_E_MAX
    return QAValue(round(delta_e, 2), passed, details)


# ----------------------------------------------------------------------------------------------
# Sets: diversity and memorisation
# ----------------------------------------------------------------------------------------------


def diversity(hashes: Sequence[int | str], min_hamming: float) -> QAValue:
    """Mean pairwise pHash distance among one prompt's images; fails (mode collapse) below min_hamming."""
    if len(hashes) < 2:
        return QAValue(None, None, {"reason": "fewer than 2 images", "n": len(hashes)})
    d = pairwise_hamming(hashes)
    iu = np.triu_indices(len(hashes), k=1)
    pairs = d[iu]
    mean = float(pairs.mean())
    return QAValue(
        round(mean, 3),
        mean >= min_hamming,
        {
            "n": len(hashes),
            "min_pair": int(pairs.min()),
            "max_pair": int(pairs.max()),
            "threshold": min_hamming,
        },
    )


def hash_folder(folder: Path) -> dict[str, str]:
    """pHash (hex) of every image in ``folder`` (png/jpg/webp), by file name."""
    out: dict[str, str] = {}
    for p in sorted(Path(folder).iterdir()):
        if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"} and p.is_file():
            with Image.open(p) as img:
                out[p.name] = phash_hex(img.convert("RGB"))
    return out


def nearest_training_image(
    query: int | str, train_hashes: Mapping[str, str]
) -> tuple[str | None, int | None]:
    """(file, distance) of the training image nearest to ``query`` by pHash."""
    if not train_hashes:
        return None, None
    names = list(train_hashes)
    d = hamming_to_set(query, [train_hashes[n] for n in names])
    i = int(d.argmin())
    return names[i], int(d[i])


# ----------------------------------------------------------------------------------------------
# Per image and summary
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageQA:
    prompt_index: int
    image_index: int
    prompt: str
    path: str
    phash: str
    white_background: QAValue
    centring: QAValue
    single_object: QAValue
    sharpness: QAValue
    colour: QAValue
    fill: QAValue
    nearest_train: str | None = None
    nearest_train_distance: int | None = None
    memorised: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("white_background", "centring", "single_object", "sharpness", "colour", "fill"):
            d[key] = getattr(self, key).to_dict()
        d["product_shot"] = self.product_shot
        return d

    @property
    def product_shot(self) -> bool:
        """A single, centred, shoe-shaped object that fills the frame sensibly, in the prompt's colour
        (colour not required when the prompt names none); the backdrop may be any plain one."""
        return bool(
            self.single_object.passed
            and self.centring.passed
            and self.fill.passed
            and self.fill.details.get("shoe_shaped")
            and self.colour.passed is not False
        )


def image_qa(
    image: Image.Image,
    prompt: str,
    *,
    prompt_index: int = 0,
    image_index: int = 0,
    path: str = "",
    train_hashes: Mapping[str, str] | None = None,
) -> ImageQA:
    """All per-image checks for one generation (plus its nearest training image when hashes are given)."""
    rgb = image.convert("RGB")
    h = phash(rgb)
    nearest, dist = nearest_training_image(h, train_hashes or {})
    return ImageQA(
        prompt_index=prompt_index,
        image_index=image_index,
        prompt=prompt,
        path=path,
        phash=f"{h:016x}",
        white_background=white_background(rgb),
        centring=centring(rgb),
        single_object=single_object(rgb),
        sharpness=sharpness(rgb),
        colour=colour_adherence(rgb, prompt),
        fill=fill(rgb),
        nearest_train=nearest,
        nearest_train_distance=dist,
        memorised=dist is not None and dist <= MEMORISATION_MAX_DISTANCE,
    )


def _share(values: Sequence[bool | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return round(sum(scored) / len(scored), 4) if scored else None


@dataclass
class QASummary:
    """Aggregates over one model's generations (what the checklist consumes)."""

    n_images: int
    white_background_share: float | None
    centred_share: float | None
    single_object_share: float | None
    colour_respected_share: float | None
    n_colour_scored: int
    fill_share: float | None
    product_shot_share: float | None
    mean_sharpness: float | None
    min_diversity: float | None
    mode_collapse_prompts: list[int]
    memorised: list[dict[str, Any]]
    per_prompt: list[dict[str, Any]]
    images: list[ImageQA]
    diversity_min_hamming: float
    memorisation_max_distance: int = MEMORISATION_MAX_DISTANCE

    def to_dict(self, include_images: bool = True) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "images"}
        if include_images:
            d["images"] = [i.to_dict() for i in self.images]
        return d


def qa_summary(images: Sequence[ImageQA], prompts: Sequence[str], diversity_min_hamming: float) -> QASummary:
    """Shares of passing images, per-prompt table, diversity per prompt and memorisation flags."""
    per_prompt: list[dict[str, Any]] = []
    collapse: list[int] = []
    diversities: list[float] = []
    for p, prompt in enumerate(prompts):
        mine = [i for i in images if i.prompt_index == p]
        div = diversity([i.phash for i in mine], diversity_min_hamming)
        if div.value is not None:
            diversities.append(div.value)
            if not div.passed:
                collapse.append(p)
        per_prompt.append(
            {
                "prompt_index": p,
                "prompt": prompt,
                "prompt_colours": prompt_colours(prompt),
                "n_images": len(mine),
                "white_background_share": _share([i.white_background.passed for i in mine]),
                "centred_share": _share([i.centring.passed for i in mine]),
                "single_object_share": _share([i.single_object.passed for i in mine]),
                "fill_share": _share([i.fill.passed for i in mine]),
                "product_shot_share": _share([i.product_shot for i in mine]),
                "colour_respected_share": _share([i.colour.passed for i in mine]),
                "measured_colours": [i.colour.details.get("measured") for i in mine],
                "diversity_mean_hamming": div.value,
                "mode_collapse": None if div.passed is None else not div.passed,
                "memorised": sum(i.memorised for i in mine),
            }
        )
    sharp = [i.sharpness.value for i in images if i.sharpness.value is not None]
    colour_scored = [i.colour.passed for i in images if i.colour.passed is not None]
    return QASummary(
        n_images=len(images),
        white_background_share=_share([i.white_background.passed for i in images]),
        centred_share=_share([i.centring.passed for i in images]),
        single_object_share=_share([i.single_object.passed for i in images]),
        colour_respected_share=_share(colour_scored),
        n_colour_scored=len(colour_scored),
        fill_share=_share([i.fill.passed for i in images]),
        product_shot_share=_share([i.product_shot for i in images]),
        mean_sharpness=round(float(np.mean(sharp)), 2) if sharp else None,
        min_diversity=min(diversities) if diversities else None,
        mode_collapse_prompts=collapse,
        memorised=[
            {
                "image": i.path,
                "prompt_index": i.prompt_index,
                "image_index": i.image_index,
                "nearest_train": i.nearest_train,
                "distance": i.nearest_train_distance,
            }
            for i in images
            if i.memorised
        ],
        per_prompt=per_prompt,
        images=list(images),
        diversity_min_hamming=diversity_min_hamming,
    )


def run_qa(
    generated: Sequence[Any],
    prompts: Sequence[str],
    diversity_min_hamming: float,
    train_hashes: Mapping[str, str] | None = None,
) -> QASummary:
    """QA for :class:`~.generate.GeneratedImage` records (anything with prompt_index/image_index/prompt/path)."""
    results = []
    for g in generated:
        with Image.open(g.path) as img:
            results.append(
                image_qa(
                    img,
                    g.prompt,
                    prompt_index=g.prompt_index,
                    image_index=g.image_index,
                    path=str(g.path),
                    train_hashes=train_hashes,
                )
            )
    return qa_summary(results, prompts, diversity_min_hamming)
