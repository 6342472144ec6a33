"""The specs sheet: one row per SKU to photograph, validated before anything is generated.

Columns ``sku, colour, type, characteristics, count`` (required; ``characteristics`` may be empty) and the
optional ``view``, ``prompt`` (used verbatim instead of the caption template) and ``negative_prompt``.
Headers are matched case-insensitively; unknown columns are ignored (and noted).

Every bad row is refused with a reason, the others go on: a missing SKU, colour or type, a count that is
not a whole number in ``[1, renders.max_per_sku]``, a duplicate SKU (ignoring case; the first row keeps it), an SKU that
is not a safe file name (path separators, ``.``/``..``, control characters, characters Windows refuses,
a leading formula character that spreadsheets would execute, more than ``MAX_SKU_BYTES``), a control
character (newline, tab, NUL) in any text (it would break the PNG ``parameters`` lines), undecodable
bytes, or a prompt over the CLIP-sized limit. Unicode text is fine; SKUs are NFC-normalised so two
spellings of "é" are one SKU.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoe_lora_pipeline.core.captions import MAX_CAPTION_CHARS, render_caption
from shoe_lora_pipeline.core.csvutil import csv_records
from shoe_lora_pipeline.core.fsutil import atomic_write_text

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.config import PipelineConfig

REQUIRED_COLUMNS = ("sku", "colour", "type", "characteristics", "count")
OPTIONAL_COLUMNS = ("view", "prompt", "negative_prompt")
MAX_SKU_BYTES = 100  # a folder and file-name component everywhere we write; far below any 255-byte limit
MAX_TEXT_CHARS = 200  # colour / type / characteristics / view
REJECTED_COLUMNS = ("line", "sku", "problem", *REQUIRED_COLUMNS[1:], *OPTIONAL_COLUMNS)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_WINDOWS_FORBIDDEN = set('<>:"|?*')
# A cell starting with one of these is run as a formula by spreadsheet programs (CSV injection).
FORMULA_START = ("=", "+", "-", "@")


class SpecsError(ValueError):
    """The specs sheet as a whole cannot be read (missing, no header, a required column absent)."""


@dataclass(frozen=True)
class SpecRow:
    """One accepted row; ``prompt`` and ``negative_prompt`` are resolved (template or override)."""

    line: int
    sku: str
    colour: str
    type: str
    characteristics: str
    count: int
    view: str
    prompt: str
    negative_prompt: str
    prompt_source: str  # "template" | "sheet"

    def row_hash(self) -> str:
        """sha256 of what decides the images (the line number does not)."""
        payload = {k: v for k, v in asdict(self).items() if k != "line"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class RejectedRow:
    line: int
    sku: str
    problem: str
    values: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"line {self.line} (sku {self.sku!r}): {self.problem}"


@dataclass
class SpecsSheet:
    path: Path | None
    sha256: str
    rows: list[SpecRow]
    rejected: list[RejectedRow]
    notes: list[str] = field(default_factory=list)


def file_name_problem(sku: str) -> str | None:
    """Why ``sku`` cannot be a folder / file name on every platform we write to, or None."""
    if not sku:
        return "missing sku"
    if _CONTROL.search(sku):
        return "sku contains a control character (NUL, newline, tab, …)"
    if "/" in sku or "\\" in sku:
        return "sku contains a path separator"
    if sku in {".", ".."} or sku.startswith("."):
        return "sku starts with '.' (hidden or parent folder)"
    if _WINDOWS_FORBIDDEN & set(sku):
        return (
            f"sku contains a character file systems refuse ({''.join(sorted(_WINDOWS_FORBIDDEN & set(sku)))})"
        )
    if sku.endswith((" ", ".")):
        return "sku ends with a space or '.'"
    if sku.startswith(FORMULA_START):
        return f"sku starts with {sku[0]!r}, which spreadsheets run as a formula"
    if len(sku.encode("utf-8")) > MAX_SKU_BYTES:
        return f"sku is {len(sku.encode('utf-8'))} bytes long (at most {MAX_SKU_BYTES})"
    return None


def _text_problem(name: str, value: str, limit: int = MAX_TEXT_CHARS) -> str | None:
    if _CONTROL.search(value):
        return f"{name} contains a control character (newline, tab, NUL, …)"
    if len(value) > limit:
        return f"{name} is {len(value)} characters long (at most {limit})"
    return None


def _parse_count(raw: str, max_per_sku: int) -> tuple[int | None, str | None]:
    text = raw.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,9}", text):
        return None, f"count {raw!r} is not a whole number"
    value = int(text)
    if value <= 0:
        return None, f"count {value} must be at least 1"
    if value > max_per_sku:
        return None, f"count {value} is above renders.max_per_sku = {max_per_sku}"
    return value, None


def characteristics_phrase(characteristics: str, view: str, default: str) -> str:
    """``view`` ("side" → "side view") first, then the characteristics; ``default`` when both are empty."""
    view = view.strip()
    if view and not view.lower().endswith("view"):
        view = f"{view} view"
    parts = [p for p in (view, characteristics.strip()) if p]
    return ", ".join(parts) if parts else default


def _check_row(
    values: Mapping[str, str],
    line: int,
    *,
    template: str,
    default_characteristics: str,
    default_negative_prompt: str,
    max_per_sku: int,
) -> SpecRow | str:
    """The accepted row, or the reason it is refused."""
    if any("\ufffd" in v for v in values.values()):
        return "row is not valid UTF-8 (undecodable bytes)"
    sku = unicodedata.normalize("NFC", values.get("sku", "").strip())
    problem = file_name_problem(sku)
    if problem:
        return problem
    colour, type_ = values.get("colour", "").strip(), values.get("type", "").strip()
    if not colour:
        return "missing colour"
    if not type_:
        return "missing type"
    for name in ("colour", "type", "characteristics", "view"):
        problem = _text_problem(name, values.get(name, ""))
        if problem:
            return problem
    for name in ("prompt", "negative_prompt"):
        problem = _text_problem(name, values.get(name, ""), MAX_CAPTION_CHARS)
        if problem:
            return problem
    count, problem = _parse_count(values.get("count", ""), max_per_sku)
    if problem:
        return problem
    override = " ".join(values.get("prompt", "").split())
    chars = characteristics_phrase(
        values.get("characteristics", ""), values.get("view", ""), default_characteristics
    )
    prompt = override or render_caption(template, colour, type_, chars)
    if len(prompt) > MAX_CAPTION_CHARS:
        return f"prompt is {len(prompt)} characters long (at most {MAX_CAPTION_CHARS})"
    return SpecRow(
        line=line,
        sku=sku,
        colour=colour,
        type=type_,
        characteristics=values.get("characteristics", "").strip(),
        count=int(count or 0),
        view=values.get("view", "").strip(),
        prompt=prompt,
        negative_prompt=" ".join(values.get("negative_prompt", "").split()) or default_negative_prompt,
        prompt_source="sheet" if override else "template",
    )


def parse_specs_text(
    text: str,
    *,
    template: str,
    default_characteristics: str,
    default_negative_prompt: str,
    max_per_sku: int,
    source: str = "specs sheet",
) -> tuple[list[SpecRow], list[RejectedRow], list[str]]:
    """(accepted rows, refused rows, notes) of a sheet's text. Raises :class:`SpecsError` without a usable
    header."""
    header: list[str] | None = None
    rows: list[SpecRow] = []
    rejected: list[RejectedRow] = []
    notes: list[str] = []
    first_line: dict[str, int] = {}
    for record in csv_records(io.StringIO(text)):
        line, fields = record.line, record.fields
        if record.error is not None:
            rejected.append(RejectedRow(line, "", f"unparseable line: {record.error}"))
            continue
        if record.blank:
            continue
        if header is None:
            header = [h.strip().lower() for h in fields]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise SpecsError(f"{source}: header {fields!r} lacks the column(s) {', '.join(missing)}")
            unknown = [h for h in header if h not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
            if unknown:
                notes.append(f"{source}: columns ignored: {', '.join(unknown)}")
            continue
        values = {name: fields[i] if i < len(fields) else "" for i, name in enumerate(header)}
        shown = {k: values.get(k, "") for k in REJECTED_COLUMNS[3:]}
        sku = values.get("sku", "").strip()
        if len(fields) != len(header):
            rejected.append(RejectedRow(line, sku, f"{len(fields)} fields, header has {len(header)}", shown))
            continue
        checked = _check_row(
            values,
            line,
            template=template,
            default_characteristics=default_characteristics,
            default_negative_prompt=default_negative_prompt,
            max_per_sku=max_per_sku,
        )
        if isinstance(checked, str):
            rejected.append(RejectedRow(line, sku, checked, shown))
        elif checked.sku.casefold() in first_line:
            # Case-insensitive: macOS and Windows would put both SKUs in one folder.
            problem = f"duplicate sku: line {first_line[checked.sku.casefold()]} has it"
            rejected.append(RejectedRow(line, checked.sku, problem, shown))
        else:
            first_line[checked.sku.casefold()] = line
            rows.append(checked)
    if header is None:
        raise SpecsError(f"{source}: empty file (no header line)")
    return rows, rejected, notes


def spec_rules(cfg: PipelineConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`read_specs` / :func:`parse_specs_text` a category's config gives:
    the caption template the LoRA was trained with, so prompts speak the training captions' language."""
    return {
        "template": cfg.dataset.caption_template,
        "default_characteristics": cfg.dataset.default_characteristics,
        "default_negative_prompt": cfg.renders.negative_prompt,
        "max_per_sku": cfg.renders.max_per_sku,
    }


def read_specs(
    path: Path,
    *,
    template: str,
    default_characteristics: str,
    default_negative_prompt: str,
    max_per_sku: int,
) -> SpecsSheet:
    """Parse and validate the specs sheet at ``path`` (never modified)."""
    path = Path(path)
    if not path.is_file():
        raise SpecsError(f"renders.specs_csv = {str(path)!r}: file not found")
    data = path.read_bytes()
    # utf-8-sig drops a BOM; undecodable bytes become U+FFFD and refuse only their row.
    text = data.decode("utf-8-sig", errors="replace")
    rows, rejected, notes = parse_specs_text(
        text,
        template=template,
        default_characteristics=default_characteristics,
        default_negative_prompt=default_negative_prompt,
        max_per_sku=max_per_sku,
        source=str(path),
    )
    return SpecsSheet(path, hashlib.sha256(data).hexdigest(), rows, rejected, notes)


def spreadsheet_safe(value: Any) -> str:
    """A cell a spreadsheet shows as text: a leading formula character gets a ``'`` in front."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def write_rejected(rejected: Iterable[RejectedRow], path: Path) -> Path:
    """``rejected_specs.csv``: line, sku, problem and the row's values (header only when none)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REJECTED_COLUMNS)
    for r in rejected:
        cells = [r.line, r.sku, r.problem, *(r.values.get(c, "") for c in REJECTED_COLUMNS[3:])]
        # Control characters are written escaped: this file is for people, and one hostile row must not
        # break its layout.
        writer.writerow(
            [spreadsheet_safe(_CONTROL.sub(lambda m: repr(m.group())[1:-1], str(c))) for c in cells]
        )
    return atomic_write_text(path, buf.getvalue())
