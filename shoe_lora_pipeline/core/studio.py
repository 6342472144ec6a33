"""What the review studio does with files, without a web framework or Dagster: check an uploaded specs
sheet, save it with a dated backup, list a published set with each image's provenance, resolve a path a
browser asks for inside the renders folder (and nowhere else), and name a category's renders assets and
the ``dg launch`` command that materialises them.

The rules are the pipeline's own: rows are checked by :func:`.renders.specs.parse_specs_text` (what
product_renders applies), files are written by :mod:`.fsutil`'s atomic writers.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.csvutil import csv_records
from shoe_lora_pipeline.core.fsutil import atomic_write_file, atomic_write_text
from shoe_lora_pipeline.core.renders.specs import SpecRow, SpecsError, parse_specs_text, spec_rules

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_UPLOAD_ROWS = 10_000
RENDER_ASSETS = ("product_renders", "render_review")  # "Render": new candidates, reviews.csv merged
PUBLISH_ASSETS = ("render_review", "published_renders")  # "Publish approved"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SheetProblem:
    line: int  # 0: the file as a whole
    sku: str
    reason: str


@dataclass
class SpecsCheck:
    """An uploaded or edited specs sheet, checked: its text, its cells (for the table) and every problem.
    ``ok`` only when nothing is refused: a sheet is saved whole or not at all."""

    text: str
    header: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the CSV line of each row in ``cells``
    rows: list[SpecRow] = field(default_factory=list)
    problems: list[SheetProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problems_by_line(self) -> dict[int, str]:
        return {p.line: p.reason for p in self.problems if p.line}


def _delimiter_hint(first_line: str) -> str:
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        if sep in first_line and "," not in first_line:
            return f" (the header is separated by {name}: save the sheet as comma-separated CSV)"
    return ""


def check_specs_upload(
    data: bytes,
    cfg: PipelineConfig,
    *,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_rows: int = MAX_UPLOAD_ROWS,
) -> SpecsCheck:
    """Check a specs sheet's bytes with the pipeline's rules (:func:`spec_rules` of ``cfg``). Refused as a
    whole, with the line: over ``max_bytes`` or ``max_rows``, not UTF-8, no usable header (a wrong
    delimiter says so); per row: every reason :mod:`.renders.specs` gives (duplicate SKU included)."""
    if len(data) > max_bytes:
        return SpecsCheck(
            "", problems=[SheetProblem(0, "", f"the file is {len(data):,} bytes; at most {max_bytes:,}")]
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        reason = f"not UTF-8 (byte 0x{data[exc.start]:02x}); save the sheet as CSV UTF-8"
        return SpecsCheck("", problems=[SheetProblem(line, "", reason)])
    return check_specs_text(text, cfg, max_rows=max_rows)


def check_specs_text(text: str, cfg: PipelineConfig, *, max_rows: int = MAX_UPLOAD_ROWS) -> SpecsCheck:
    """:func:`check_specs_upload` for text already decoded (the edited table)."""
    check = SpecsCheck(text)
    for record in csv_records(text.splitlines(keepends=True)):
        if record.blank:
            continue
        if not check.header:
            check.header = [h.strip() for h in record.fields]
            continue
        check.cells.append(record.fields)
        check.lines.append(record.line)
    if len(check.cells) > max_rows:
        check.problems.append(SheetProblem(0, "", f"{len(check.cells):,} rows; at most {max_rows:,}"))
        check.cells, check.lines = check.cells[:max_rows], check.lines[:max_rows]
        return check
    try:
        rows, rejected, notes = parse_specs_text(text, **spec_rules(cfg), source="the sheet")
    except SpecsError as exc:
        first = text.split("\n", 1)[0]
        check.problems.append(SheetProblem(1, "", f"{exc}{_delimiter_hint(first)}"))
        return check
    check.rows, check.notes = rows, notes
    check.problems += [SheetProblem(r.line, r.sku, r.problem) for r in rejected]
    return check


def table_text(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """The CSV text of an edited table (rows with every cell empty are dropped)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(row for row in cells if any(c.strip() for c in row))
    return buf.getvalue()


def backup_dir(specs_path: Path) -> Path:
    """Where the previous versions of a specs sheet are kept: ``<stem>.backups/`` beside it."""
    return specs_path.with_name(f"{specs_path.stem}.backups")


def save_specs(specs_path: Path, text: str, now: datetime | None = None) -> Path | None:
    """Write ``text`` as the specs sheet, atomically; the previous sheet is first copied (atomically) to
    ``<stem>.backups/<stem>-<UTC time>.csv``. Returns that backup (None when there was no sheet)."""
    backup = None
    if specs_path.is_file():
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")
        backup = backup_dir(specs_path) / f"{specs_path.stem}-{stamp}{specs_path.suffix}"
        atomic_write_file(backup, lambda tmp: shutil.copyfile(specs_path, tmp))
    atomic_write_text(specs_path, text)
    return backup


def resolve_inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` when it is a file inside ``root`` after every symlink is followed; None for an
    absolute path, a ``..`` part, a NUL, a missing file or anything leading out of ``root``."""
    if not relative or "\x00" in relative or relative.startswith(("/", "\\")) or "\\" in relative:
        return None
    parts = Path(relative).parts
    if any(p in ("..", ".") for p in parts) or Path(relative).is_absolute():
        return None
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / relative))
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target


@dataclass(frozen=True)
class PublishedImage:
    profile: str
    sku: str
    relative: str  # to the renders folder: published/<profile>/<sku>/<file>
    name: str
    size_bytes: int
    summary: dict[str, Any]  # the provenance a person checks: source type, seed, LoRA, runs, approved by


def _summary(path: Path) -> dict[str, Any]:
    from shoe_lora_pipeline.core.marking import read_marking

    try:
        marking = read_marking(path)
    except (OSError, ValueError) as exc:
        return {"error": f"unreadable: {exc}"}
    render = marking.get("render") or {}
    lora = render.get("lora_provenance") or {}
    c2pa = marking.get("c2pa") or {}
    return {
        "digital_source_type": (marking.get("digital_source_type") or "missing").rsplit("/", 1)[-1],
        "seed": render.get("seed"),
        "approved_by": render.get("approved_by"),
        "qa_score": (render.get("qa") or {}).get("score"),
        "lora_sha256": (render.get("lora_sha256") or "")[:12],
        "publish_run": render.get("dagster_run_id"),
        "render_run": render.get("render_run_id"),
        "training_run": lora.get("dagster_run_id"),
        "c2pa": (
            f"{c2pa.get('validation_state') or 'present'} ({c2pa.get('signer') or 'unknown signer'})"
            if c2pa.get("present")
            else "none"
        ),
    }


def published_set(published_dir: Path, renders_dir: Path) -> dict[str, dict[str, list[PublishedImage]]]:
    """``{profile: {sku: [images]}}`` of what is published now (hidden temporary folders skipped)."""
    out: dict[str, dict[str, list[PublishedImage]]] = {}
    if not published_dir.is_dir():
        return out
    for profile in sorted(p for p in published_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        skus: dict[str, list[PublishedImage]] = {}
        for sku_dir in sorted(p for p in profile.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = [
                PublishedImage(
                    profile.name,
                    sku_dir.name,
                    f.relative_to(renders_dir).as_posix(),
                    f.name,
                    f.stat().st_size,
                    _summary(f),
                )
                for f in sorted(sku_dir.iterdir())
                if f.is_file() and not f.name.startswith(".")
            ]
            if images:
                skus[sku_dir.name] = images
        out[profile.name] = skus
    return out


def refused_files(manifest_csv: Path) -> list[dict[str, str]]:
    """What the last publication refused: ``{"profile", "file", "reason"}`` per flagged cell of
    ``published/manifest.csv`` (the profile columns follow :data:`.renders.publish.MANIFEST_COLUMNS`)."""
    import csv

    from shoe_lora_pipeline.core.renders.publish import MANIFEST_COLUMNS

    if not manifest_csv.is_file():
        return []
    with manifest_csv.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        {"profile": name, "file": row.get("file", ""), "reason": value.removeprefix("flagged: ")}
        for row in rows
        for name, value in row.items()
        if name not in MANIFEST_COLUMNS and isinstance(value, str) and value.startswith("flagged: ")
    ]


def render_asset_keys(cfg: PipelineConfig, category: str, names: Sequence[str]) -> list[list[str]]:
    """Asset key paths of a category's renders stages: plain for the config's first category, under the
    category for the others (as :func:`shoe_lora_pipeline.assets._category.category_key`)."""
    primary = category == cfg.dataset.name
    return [[name] if primary else [category, name] for name in names]


def launch_command(keys: Sequence[Sequence[str]], config_path: Path | None, dagster_home: str | None) -> str:
    """The ``dg launch`` command that materialises ``keys`` from the project folder, with this config and
    Dagster instance (what to run when no Dagster webserver answers)."""
    env = []
    if dagster_home:
        env.append(f"DAGSTER_HOME={shlex.quote(dagster_home)}")
    if config_path is not None:
        env.append(f"SHOE_LORA_CONFIG={shlex.quote(str(Path(config_path).resolve()))}")
    dg_cli = Path(sys.executable).parent / "dg"
    launch = [str(dg_cli) if dg_cli.is_file() else "dg", "launch"]
    prefix = ""
    if (PROJECT_ROOT / "pyproject.toml").is_file():
        prefix = f"cd {shlex.quote(str(PROJECT_ROOT))} && "
    else:
        launch += ["-m", "shoe_lora_pipeline.definitions"]
    launch += ["--assets", ",".join("/".join(k) for k in keys)]
    return prefix + " ".join([*env, shlex.join(launch)])
