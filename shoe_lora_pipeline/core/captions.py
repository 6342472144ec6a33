"""Captions stage core: one caption per cleaned image, in the seed's ``captions.json`` format.

Caption sources, best first:

1. ``sidecar``: a text file next to the raw photo (``raw_dir/<source>.txt``), written by a person.
2. ``styles``: the image's row in ``styles.csv`` (Kaggle fashion-product-images layout), matched on
   the raw file stem (``record["id"]``).
3. ``estimated``: colour measured from the pixels, ``default_type``, ``default_characteristics``.

Type rule (so that ``{type} shoes`` reads naturally): a type phrase whose last word is itself a
footwear noun ("casual sneakers", "sandals", "heels", "flip flops") swallows the template's literal
"shoes" that follows ``{type}``; any other type phrase is an adjective and keeps it ("casual" ->
"casual shoes"). A material named in ``productDisplayName`` (leather, suede, canvas, mesh) is put in
front of the type so that the validation prompts are reachable verbatim, e.g. "brown leather casual
shoes" and "white casual sneakers".

This module imports no Dagster; the asset wraps it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from shoe_lora_pipeline.core.fsutil import atomic_write_json

# ----------------------------------------------------------------------------------------------
# styles.csv
# ----------------------------------------------------------------------------------------------

STYLES_COLUMNS = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
)
_ID_RE = re.compile(r"[0-9]{1,18}")
# A whole file of garbage should not become a million problems: stop listing (but keep counting).
MAX_LISTED_STYLES_PROBLEMS = 1000


@dataclass(frozen=True)
class StyleRow:
    """One well-formed ``styles.csv`` row; ``line`` is its first physical line (1-based)."""

    id: str
    line: int
    gender: str = ""
    master_category: str = ""
    sub_category: str = ""
    article_type: str = ""
    base_colour: str = ""
    season: str = ""
    year: str = ""
    usage: str = ""
    product_display_name: str = ""


@dataclass
class StylesTable:
    """Parsed ``styles.csv``: valid rows by id, plus every row that was refused and why.

    ``problems`` entries are ``{"line": n, "id": raw value, "problem": text, "kind": code}`` with
    kind one of ``malformed``, ``missing_id``, ``path_like_id``, ``non_numeric_id``,
    ``duplicate_id``, ``bad_header``, ``unreadable``.
    """

    path: Path | None = None
    rows: dict[str, StyleRow] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)
    problem_count: int = 0
    notes: list[str] = field(default_factory=list)
    lines_read: int = 0

    def get(self, image_id: str) -> StyleRow | None:
        return self.rows.get(image_id)

    def __len__(self) -> int:
        return len(self.rows)

    def _report(self, line: int, raw_id: Any, problem: str, kind: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED_STYLES_PROBLEMS:
            self.problems.append({"line": line, "id": raw_id, "problem": problem, "kind": kind})


def _id_problem(raw_id: str) -> tuple[str, str] | None:
    """Why ``raw_id`` cannot be used as an image id, or None. Ids are only ever compared, never
    opened, but a path-like id is a sign of a hostile or broken file and is reported as such."""
    if raw_id == "":
        return "missing_id", "missing id"
    if (
        "/" in raw_id
        or "\\" in raw_id
        or ".." in raw_id
        or os.path.isabs(raw_id)
        or re.match(r"^[A-Za-z]:", raw_id)
    ):
        return "path_like_id", f"path-like id {raw_id!r} refused"
    if not _ID_RE.fullmatch(raw_id):
        return "non_numeric_id", f"non-numeric id {raw_id!r}"
    return None


def load_styles(csv_path: Path | None) -> StylesTable:
    """Parse a fashion-product-images ``styles.csv`` robustly.

    Rows with the wrong number of fields (the real file has unquoted commas in
    ``productDisplayName``), a missing, non-numeric or path-like id, or a repeated id (the first one
    wins) are reported in ``problems`` and skipped, never guessed at. A missing file gives an empty
    table with one note: captions can then still come from sidecars or pixels.
    """
    table = StylesTable(path=Path(csv_path) if csv_path is not None else None)
    if csv_path is None:
        table.notes.append("no styles.csv configured; captions come from sidecars or pixels")
        return table
    path = Path(csv_path)
    if not path.is_file():
        table.notes.append(f"styles file {path} not found; captions come from sidecars or pixels")
        return table
    try:
        # utf-8-sig drops a BOM (which would otherwise glue itself to the "id" header); undecodable
        # bytes become U+FFFD instead of aborting the whole file.
        with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
            _parse_styles(fh, table)
    except OSError as exc:
        table._report(0, None, f"cannot read {path}: {exc}", "unreadable")
        table.rows.clear()
    return table


def _parse_styles(fh: Any, table: StylesTable) -> None:
    reader = csv.reader(fh, strict=False)
    header: list[str] | None = None
    col: dict[str, int] = {}
    prev_line = 0
    while True:
        start = prev_line + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # e.g. a field over csv.field_size_limit(); the reader resumes on the next line.
            table._report(start, None, f"unparseable line: {exc}", "malformed")
            if reader.line_num == prev_line:  # no progress: give up rather than spin
                break
            prev_line = reader.line_num
            continue
        prev_line = reader.line_num
        table.lines_read = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue  # blank line
        if header is None:
            header = [h.strip() for h in fields]
            col = {name: i for i, name in enumerate(header)}
            if "id" not in col:
                table._report(start, None, f"header has no 'id' column: {header[:12]!r}", "bad_header")
                return
            missing = [c for c in STYLES_COLUMNS if c not in col]
            if missing:
                table.notes.append(
                    f"styles header lacks columns {missing}; those values are treated as empty"
                )
            continue
        raw_id = fields[col["id"]].strip() if col["id"] < len(fields) else ""
        if len(fields) != len(header):
            table._report(
                start,
                raw_id,
                f"malformed row: {len(fields)} fields, header has {len(header)} "
                "(unquoted comma in a value?); row skipped",
                "malformed",
            )
            continue
        bad = _id_problem(raw_id)
        if bad is not None:
            table._report(start, raw_id, bad[1], bad[0])
            continue
        if raw_id in table.rows:
            first = table.rows[raw_id].line
            table._report(start, raw_id, f"duplicate id {raw_id}: line {first} is used", "duplicate_id")
            continue

        values = {name: fields[i].strip() for name, i in col.items()}

        def get(name: str, values: dict[str, str] = values) -> str:
            return values.get(name, "")

        table.rows[raw_id] = StyleRow(
            id=raw_id,
            line=start,
            gender=get("gender"),
            master_category=get("masterCategory"),
            sub_category=get("subCategory"),
            article_type=get("articleType"),
            base_colour=get("baseColour"),
            season=get("season"),
            year=get("year"),
            usage=get("usage"),
            product_display_name=get("productDisplayName"),
        )


# ----------------------------------------------------------------------------------------------
# Words: colour, type, characteristics
# ----------------------------------------------------------------------------------------------

# baseColour (lower-case) -> caption colour word. Near-synonyms collapse to the seed's vocabulary
# so that the LoRA sees each colour word often.
COLOUR_WORDS: dict[str, str] = {
    "black": "black",
    "white": "white",
    "off white": "off-white",
    "cream": "off-white",
    "grey": "grey",
    "gray": "grey",
    "grey melange": "grey",
    "steel": "grey",
    "charcoal": "charcoal",
    "silver": "silver",
    "brown": "brown",
    "coffee brown": "brown",
    "mushroom brown": "brown",
    "bronze": "bronze",
    "copper": "copper",
    "tan": "tan",
    "khaki": "khaki",
    "beige": "beige",
    "nude": "beige",
    "skin": "beige",
    "taupe": "taupe",
    "blue": "blue",
    "navy blue": "navy",
    "navy": "navy",
    "turquoise blue": "turquoise",
    "teal": "teal",
    "red": "red",
    "maroon": "maroon",
    "burgundy": "burgundy",
    "rust": "rust",
    "green": "green",
    "olive": "olive",
    "sea green": "green",
    "lime green": "green",
    "fluorescent green": "green",
    "yellow": "yellow",
    "mustard": "mustard",
    "gold": "gold",
    "orange": "orange",
    "peach": "peach",
    "pink": "pink",
    "rose": "pink",
    "magenta": "magenta",
    "purple": "purple",
    "lavender": "lavender",
    "mauve": "mauve",
    "multi": "multicolour",
    "metallic": "metallic",
}
_NO_COLOUR = {"", "na", "n/a", "none", "null", "nan", "-"}
_PLAIN_WORDS_RE = re.compile(r"[a-z]+(?:[ -][a-z]+){0,2}")

# articleType (lower-case) -> type phrase; a phrase ending in a footwear noun replaces "shoes".
ARTICLE_TYPES: dict[str, str] = {
    "casual shoes": "casual",
    "sports shoes": "sports",
    "formal shoes": "formal",
    "sneakers": "casual sneakers",
    "flats": "flat",
    "heels": "heels",
    "sandals": "sandals",
    "sports sandals": "sports sandals",
    "flip flops": "flip flops",
    "booties": "booties",
    "boots": "boots",
    "loafers": "loafers",
}
# articleTypes in the Footwear category that are not shoes at all.
NON_SHOE_ARTICLES = {"shoe accessories", "shoe laces", "socks"}
# Adjective types that a more specific noun in the product name may refine ("casual" + Sneakers).
_REFINABLE = {"casual", "sports", "formal"}
_NAME_NOUNS = (
    (re.compile(r"\bsneakers?\b", re.I), "sneakers"),
    (re.compile(r"\bloafers?\b", re.I), "loafers"),
    (re.compile(r"\bmoccasins?\b", re.I), "moccasins"),
    (re.compile(r"\bboots?\b", re.I), "boots"),
)
USAGE_TYPES = {"casual": "casual", "sports": "sports", "formal": "formal", "smart casual": "smart casual"}
FOOTWEAR_NOUNS = {
    "shoe",
    "shoes",
    "sneakers",
    "trainers",
    "sandals",
    "heels",
    "pumps",
    "flats",
    "flops",
    "boots",
    "booties",
    "loafers",
    "moccasins",
    "slippers",
    "slides",
    "clogs",
    "mules",
    "brogues",
    "oxfords",
    "espadrilles",
}
_MATERIALS = (
    (re.compile(r"\bsuede\b", re.I), "suede"),
    (re.compile(r"\bcanvas\b", re.I), "canvas"),
    (re.compile(r"(?<!faux )(?<!synthetic )(?<!pu )(?<!artificial )\bleather\b", re.I), "leather"),
    (re.compile(r"\bmesh\b", re.I), "mesh"),
)
_FEATURES = (
    (re.compile(r"\blace[- ]?ups?\b", re.I), "lace-up"),
    (re.compile(r"\bslip[- ]?ons?\b", re.I), "slip-on"),
    (re.compile(r"\bvelcro\b", re.I), "velcro strap"),
    (re.compile(r"\b(?:high|hi)[- ]?tops?\b", re.I), "high-top"),
    (re.compile(r"\bmid[- ]?tops?\b", re.I), "mid-top"),
)


def colour_word(base_colour: str) -> str | None:
    """Caption colour word for a ``baseColour`` value, or None when it names no usable colour."""
    key = " ".join(base_colour.strip().lower().split())
    if key in _NO_COLOUR:
        return None
    if key in COLOUR_WORDS:
        return COLOUR_WORDS[key]
    # An unlisted but plain colour name ("sky blue") is used as written; anything else is not
    # trusted into a prompt.
    return key if _PLAIN_WORDS_RE.fullmatch(key) else None


def type_from_style(row: StyleRow, default_type: str) -> tuple[str, bool]:
    """(type phrase, known) from articleType, refined by the product name; usage as fallback."""
    article = " ".join(row.article_type.lower().split())
    phrase = ARTICLE_TYPES.get(article)
    if phrase is None:
        phrase = USAGE_TYPES.get(" ".join(row.usage.lower().split()))
        if phrase is None:
            return default_type, False
    if phrase in _REFINABLE:
        for pattern, noun in _NAME_NOUNS:
            if pattern.search(row.product_display_name):
                return f"{phrase} {noun}", True
    return phrase, True


def material_from_name(name: str) -> str | None:
    for pattern, word in _MATERIALS:
        if pattern.search(name):
            return word
    return None


def features_from_name(name: str) -> list[str]:
    return [word for pattern, word in _FEATURES if pattern.search(name)]


def render_caption(template: str, colour: str, type_phrase: str, characteristics: str) -> str:
    """Fill the template; a type phrase ending in a footwear noun absorbs the template's "shoes".

    Placeholders are substituted literally (not ``str.format``) so stray braces in a template are
    harmless; doubled spaces and empty ", ," left by empty values are tidied.
    """
    words = type_phrase.split()
    if words and words[-1].lower() in FOOTWEAR_NOUNS:
        template = re.sub(r"\{type\}\s+shoes?\b", "{type}", template)
    text = (
        template.replace("{colour}", colour.strip())
        .replace("{type}", type_phrase.strip())
        .replace("{characteristics}", characteristics.strip())
    )
    text = re.sub(r"\s*,\s*(?=,)", "", text)  # ", ," from an empty characteristics
    text = re.sub(r"\s+,", ",", text)
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# Colour from pixels
# ----------------------------------------------------------------------------------------------

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


_PALETTE_NAMES = [name for name, _ in COLOUR_PALETTE]
_PALETTE_LAB = srgb_to_lab(np.array([rgb for _, rgb in COLOUR_PALETTE], dtype=np.float64))


def nearest_colour_name(rgb: np.ndarray | tuple[float, float, float]) -> tuple[str, float, str, float]:
    """(best name, its ΔE76, runner-up name of a different colour, its ΔE76)."""
    lab = srgb_to_lab(np.asarray(rgb, dtype=np.float64))
    d = np.linalg.norm(_PALETTE_LAB - lab, axis=1)
    order = np.argsort(d, kind="stable")
    best = _PALETTE_NAMES[order[0]]
    second = next((i for i in order[1:] if _PALETTE_NAMES[i] != best), order[0])
    return best, float(d[order[0]]), _PALETTE_NAMES[second], float(d[second])


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


# ----------------------------------------------------------------------------------------------
# Building captions
# ----------------------------------------------------------------------------------------------

MAX_SIDECAR_BYTES = 4096
MAX_CAPTION_CHARS = 400  # ~77 CLIP tokens; longer text is truncated by the text encoder anyway


class CaptionsFormatError(ValueError):
    """A captions.json (or manifest) is not in the expected format; the message names file and entry."""


@dataclass
class CaptionsResult:
    entries: list[dict[str, Any]]
    source_counts: dict[str, int]
    problems: list[dict[str, Any]]
    problem_counts: dict[str, int]
    colour_counts: dict[str, int]
    type_counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    styles_rows: int = 0
    styles_matched: int = 0

    @property
    def counts_by_source(self) -> dict[str, int]:
        """Alias of ``source_counts`` (the name the captions asset uses)."""
        return self.source_counts


def _plain_filename(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value not in {"", ".", ".."}
        and "/" not in value
        and "\\" not in value
        and "\x00" not in value
    )


def _safe_relative_source(source: Any) -> PurePosixPath | None:
    """The manifest's ``source`` as a relative posix path without ``..``, or None if unsafe."""
    if not isinstance(source, str) or not source or "\\" in source or "\x00" in source:
        return None
    p = PurePosixPath(source)
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", source):
        return None
    return p


def read_sidecar(raw_dir: Path, source: str) -> tuple[str | None, str | None, str | None]:
    """(caption, problem, sidecar path) for ``raw_dir/<source with .txt suffix>``.

    No file: (None, None, path). A file that escapes ``raw_dir`` (``..``, absolute, or a symlink
    pointing outside), is not a regular file, is not UTF-8, is empty or too long is a problem and is
    not used.
    """
    rel = _safe_relative_source(source)
    if rel is None:
        return None, f"source path {source!r} is not a safe relative path; sidecar not looked up", None
    rel_txt = rel.with_suffix(".txt")
    shown = rel_txt.as_posix()
    root = raw_dir.resolve()
    candidate = raw_dir.joinpath(*rel_txt.parts)
    if not os.path.lexists(candidate):
        return None, None, shown
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        return None, f"sidecar {shown} resolves outside raw_dir ({resolved}); ignored", shown
    if not resolved.is_file():
        return None, f"sidecar {shown} is not a regular file; ignored", shown
    try:
        with resolved.open("rb") as fh:
            data = fh.read(MAX_SIDECAR_BYTES + 1)
    except OSError as exc:
        return None, f"sidecar {shown} unreadable: {exc}", shown
    if len(data) > MAX_SIDECAR_BYTES:
        return None, f"sidecar {shown} larger than {MAX_SIDECAR_BYTES} bytes; ignored", shown
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"sidecar {shown} is not UTF-8 ({exc.reason}); ignored", shown
    # One line of plain text: whitespace runs (newlines included) collapse, control chars go.
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\n\t\r ")
    text = " ".join(text.split())
    if not text:
        return None, f"sidecar {shown} is empty; ignored", shown
    if len(text) > MAX_CAPTION_CHARS:
        return None, f"sidecar {shown} has {len(text)} characters (max {MAX_CAPTION_CHARS}); ignored", shown
    return text, None, shown


def read_manifest(cleaned_dir: Path) -> list[dict[str, Any]]:
    """Records of ``cleaned_dir/manifest.json``, checked for the keys this stage relies on."""
    path = Path(cleaned_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"cleaned manifest {path} not found; run the cleaning stage first")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaptionsFormatError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise CaptionsFormatError(f"{path}: expected a list of records, got {type(records).__name__}")
    seen: set[str] = set()
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise CaptionsFormatError(f"{where}: expected an object, got {type(rec).__name__}")
        if not _plain_filename(rec.get("image_file")):
            raise CaptionsFormatError(
                f"{where}: image_file {rec.get('image_file')!r} must be a plain file name"
            )
        if rec["image_file"] in seen:
            raise CaptionsFormatError(f"{where}: duplicate image_file {rec['image_file']!r}")
        seen.add(rec["image_file"])
        size = rec.get("original_size")
        if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise CaptionsFormatError(f"{where} ({rec['image_file']}): original_size {size!r} must be [w, h]")
    return records


def build_captions(
    cleaned_dir: Path,
    raw_dir: Path,
    styles: StylesTable,
    template: str,
    default_type: str,
    default_characteristics: str,
) -> CaptionsResult:
    """Caption every record of ``cleaned_dir/manifest.json`` (sidecar > styles row > pixels).

    ``problems`` holds the styles problems, one ``unmatched`` entry per styles row that names no
    kept image, ``not_footwear`` rows and ``bad_sidecar`` entries (``{"kind", "problem",
    "image_file", "sidecar"}``). Entries are sorted by ``image_file``.
    """
    cleaned_dir = Path(cleaned_dir)
    raw_dir = Path(raw_dir)
    records = sorted(read_manifest(cleaned_dir), key=lambda r: r["image_file"])
    problems: list[dict[str, Any]] = list(styles.problems)
    problem_counts: Counter[str] = Counter(p["kind"] for p in styles.problems)
    # Problems beyond the listing cap are still counted.
    problem_counts["truncated_styles_problems"] = styles.problem_count - len(styles.problems)
    sources: Counter[str] = Counter({"sidecar": 0, "styles": 0, "estimated": 0})
    colours: Counter[str] = Counter()
    types: Counter[str] = Counter()
    entries: list[dict[str, Any]] = []
    matched_ids: set[str] = set()

    def report(kind: str, **info: Any) -> None:
        problem_counts[kind] += 1
        problems.append({"kind": kind, **info})

    for rec in records:
        image_file = rec["image_file"]
        rec_id = str(rec.get("id", ""))
        row = styles.get(rec_id)
        if row is not None:
            matched_ids.add(rec_id)
        meta: dict[str, Any] = {"original_size": list(rec["original_size"]), "processed": True}
        colour: str | None = None
        type_word: str | None = None
        caption: str | None = None

        sidecar_text, sidecar_problem, sidecar_path = read_sidecar(raw_dir, rec.get("source", ""))
        if sidecar_problem:
            report("bad_sidecar", image_file=image_file, sidecar=sidecar_path, problem=sidecar_problem)

        if row is not None:
            if row.article_type.lower().strip() in NON_SHOE_ARTICLES or (
                row.master_category and row.master_category.lower() != "footwear"
            ):
                report(
                    "not_footwear",
                    line=row.line,
                    id=row.id,
                    image_file=image_file,
                    problem=f"styles row is {row.master_category}/{row.article_type}, not a shoe; "
                    "its type is not used",
                )
                type_phrase, type_known = default_type, False
            else:
                type_phrase, type_known = type_from_style(row, default_type)
            type_word = type_phrase
            colour = colour_word(row.base_colour)
            meta["colour_source"] = "styles" if colour else None
            material = material_from_name(row.product_display_name)
            features = features_from_name(row.product_display_name)
            meta["type_source"] = "styles" if type_known else "default"
            meta["styles_line"] = row.line
            if material:
                meta["material"] = material

        if sidecar_text is not None:
            caption = sidecar_text
            meta["caption_source"] = "sidecar"
            meta["sidecar"] = sidecar_path
        elif row is not None:
            if colour is None:
                colour, details = _estimate_file(cleaned_dir, image_file)
                meta["colour_source"] = "pixels"
                meta["colour_estimate"] = details
            characteristics = ", ".join(features) if features else default_characteristics
            full_type = f"{material} {type_phrase}" if material else type_phrase
            caption = render_caption(template, colour, full_type, characteristics)
            meta["caption_source"] = "styles"
            meta["characteristics"] = characteristics
        else:
            colour, details = _estimate_file(cleaned_dir, image_file)
            type_word = default_type
            caption = render_caption(template, colour, default_type, default_characteristics)
            meta.update(
                {
                    "caption_source": "estimated",
                    "colour_source": "pixels",
                    "type_source": "default",
                    "colour_estimate": details,
                    "characteristics": default_characteristics,
                }
            )

        meta["colour"] = colour
        meta["type"] = type_word
        for key in ("id", "source", "source_sha256", "near_duplicate_of"):
            if key in rec:
                meta[key] = rec[key]
        sources[meta["caption_source"]] += 1
        colours[colour or "unknown"] += 1
        types[type_word or "unknown"] += 1
        entries.append({"image_file": image_file, "caption": caption, "metadata": meta})

    for row in styles.rows.values():
        if row.id not in matched_ids:
            report("unmatched", line=row.line, id=row.id, problem="styles row matches no kept image")

    return CaptionsResult(
        entries=entries,
        source_counts=dict(sources),
        problems=problems,
        problem_counts={k: v for k, v in sorted(problem_counts.items()) if v},
        colour_counts=dict(sorted(colours.items(), key=lambda kv: (-kv[1], kv[0]))),
        type_counts=dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        notes=list(styles.notes),
        styles_rows=len(styles),
        styles_matched=len(matched_ids),
    )


def _estimate_file(cleaned_dir: Path, image_file: str) -> tuple[str, dict[str, Any]]:
    path = cleaned_dir / "images" / image_file
    try:
        with Image.open(path) as img:
            return estimate_colour(img)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"cleaned image {path} listed in the manifest is missing") from exc


# ----------------------------------------------------------------------------------------------
# captions.json
# ----------------------------------------------------------------------------------------------


def validate_caption_entries(entries: Any, source: str = "captions") -> list[dict[str, Any]]:
    """Check the seed's captions.json format; raise CaptionsFormatError naming ``source`` and the entry."""
    if not isinstance(entries, list):
        raise CaptionsFormatError(f"{source}: expected a list of entries, got {type(entries).__name__}")
    seen: set[str] = set()
    for i, e in enumerate(entries):
        name = e.get("image_file") if isinstance(e, dict) else None
        where = f"{source}: entry {i}" + (f" ({name!r})" if isinstance(name, str) else "")
        if not isinstance(e, dict):
            raise CaptionsFormatError(f"{where}: expected an object, got {type(e).__name__}")
        if not _plain_filename(name):
            raise CaptionsFormatError(f"{where}: image_file must be a plain file name, got {name!r}")
        if name in seen:
            raise CaptionsFormatError(f"{where}: duplicate image_file")
        seen.add(name)
        cap = e.get("caption")
        if not isinstance(cap, str) or not cap.strip():
            raise CaptionsFormatError(f"{where}: caption must be a non-empty string, got {cap!r}")
        meta = e.get("metadata")
        if not isinstance(meta, dict):
            raise CaptionsFormatError(f"{where}: metadata must be an object, got {meta!r}")
        size = meta.get("original_size")
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise CaptionsFormatError(f"{where}: metadata.original_size must be [w, h] > 0, got {size!r}")
        if not isinstance(meta.get("processed"), bool):
            raise CaptionsFormatError(
                f"{where}: metadata.processed must be true/false, got {meta.get('processed')!r}"
            )
    return entries


def _canonical_entry(e: dict[str, Any]) -> dict[str, Any]:
    # Fixed key order (seed keys first, extras sorted) so the file is byte-identical across runs.
    meta = e["metadata"]
    ordered = {"original_size": list(meta["original_size"]), "processed": meta["processed"]}
    ordered.update({k: meta[k] for k in sorted(meta) if k not in ordered})
    return {"image_file": e["image_file"], "caption": e["caption"], "metadata": ordered}


def write_captions_json(entries: list[dict[str, Any]], path: Path) -> Path:
    """Write entries (validated, sorted by image_file) atomically: temp file in the folder + os.replace."""
    path = Path(path)
    validate_caption_entries(entries, str(path))
    data = [_canonical_entry(e) for e in sorted(entries, key=lambda e: e["image_file"])]
    return atomic_write_json(path, data, indent=2, ensure_ascii=False)


def read_captions_json(path: Path) -> list[dict[str, Any]]:
    """Read and validate a captions.json; CaptionsFormatError names the file and the bad entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaptionsFormatError(f"{path}: not valid JSON: {exc}") from exc
    return validate_caption_entries(data, str(path))
