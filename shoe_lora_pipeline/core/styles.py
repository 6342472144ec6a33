"""styles.csv (the fashion-product-images layout) and the caption vocabulary built from it.

:func:`load_styles` parses the file robustly (bad rows are reported and skipped, never guessed at);
the word helpers turn a row into the caption's colour word, type phrase, material and features.

Type rule (so that ``{type} shoes`` reads naturally): a type phrase whose last word is itself a
footwear noun ("casual sneakers", "sandals", "heels", "flip flops") swallows the template's literal
"shoes" that follows ``{type}``; any other type phrase is an adjective and keeps it ("casual" ->
"casual shoes"). A material named in ``productDisplayName`` (leather, suede, canvas, mesh) is put in
front of the type so that the validation prompts are reachable verbatim, e.g. "brown leather casual
shoes" and "white casual sneakers".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoe_lora_pipeline.core.csvutil import csv_records

# Bump when a word table or rule below changes the caption for the same inputs: every caption is
# then rebuilt (it is part of each caption's cache key).
VOCABULARY_VERSION = 1

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
    header: list[str] | None = None
    col: dict[str, int] = {}
    for record in csv_records(fh):
        start, fields = record.line, record.fields
        if record.error is not None:
            table._report(start, None, f"unparseable line: {record.error}", "malformed")
            continue
        table.lines_read = record.end_line
        if record.blank:
            continue
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

# baseColour (lower-case) -> caption colour word. Near-synonyms collapse to the recipe's vocabulary
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
