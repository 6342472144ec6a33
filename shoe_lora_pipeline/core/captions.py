"""Captions stage core: one caption per cleaned image, in the recipe's ``captions.json`` format.

Caption sources, best first:

1. ``sidecar``: a text file next to the raw photo (``raw_dir/<source>.txt``), written by a person.
2. ``metadata``: the photo's line in ``raw_dir/metadata.jsonl`` (the Hugging Face ``imagefolder``
   layout: one ``{"file_name": ..., "text": ...}`` object per line, ``file_name`` relative to raw_dir).
3. ``styles``: the image's row in ``styles.csv`` (Kaggle fashion-product-images layout), matched on
   the raw file stem (``record["id"]``); see :mod:`.styles` for the words it gives.
4. ``estimated``: the colour measured from the pixels (by the cleaning stage, stored in the cleaned
   manifest), ``default_type``, ``default_characteristics``.

Incremental: every caption has a key, the hash of its photo's cleaned-manifest record (raw content
hash, id, source, measured colour) and of everything its sources say about that photo (sidecar text,
metadata.jsonl line, styles.csv row) plus the template, the defaults and the vocabulary version. A
photo whose key is unchanged keeps its previous entry; so an edited styles.csv row re-captions exactly
the photos with that id, and a new photo is the only one captioned.

This module imports no Dagster; the asset wraps it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from shoe_lora_pipeline.core.fsutil import atomic_write_json, file_sha256

# Re-exported: callers and tests reach the colour and styles helpers through this module too.
from .colour import COLOUR_PALETTE, estimate_colour, nearest_colour_name, srgb_to_lab  # noqa: F401
from .styles import (  # noqa: F401
    ARTICLE_TYPES,
    COLOUR_WORDS,
    MAX_LISTED_STYLES_PROBLEMS,
    NON_SHOE_ARTICLES,
    STYLES_COLUMNS,
    VOCABULARY_VERSION,
    StyleRow,
    StylesTable,
    colour_word,
    features_from_name,
    load_styles,
    material_from_name,
    render_caption,
    type_from_style,
)

CAPTION_SOURCES = ("sidecar", "metadata", "styles", "estimated")
METADATA_JSONL = "metadata.jsonl"
MAX_SIDECAR_BYTES = 4096
MAX_CAPTION_CHARS = 400  # ~77 CLIP tokens; longer text is truncated by the text encoder anyway
CACHE_VERSION = 1


class CaptionsFormatError(ValueError):
    """A captions.json, manifest or metadata.jsonl is malformed; the message names the file and entry/line."""


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
    keys: dict[str, str] = field(default_factory=dict)  # image_file -> caption key (see module doc)
    captioned: list[str] = field(default_factory=list)  # image files (re)captioned in this run
    reused_count: int = 0  # entries kept from the previous run (key unchanged)

    @property
    def counts_by_source(self) -> dict[str, int]:
        """Alias of ``source_counts`` (the name the captions asset uses)."""
        return self.source_counts


# ----------------------------------------------------------------------------------------------
# Sources: sidecar .txt, metadata.jsonl, the cleaned manifest
# ----------------------------------------------------------------------------------------------


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


def clean_caption_text(text: str) -> str:
    """One line of plain text: whitespace runs (newlines included) collapse, control characters go."""
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\n\t\r ")
    return " ".join(text.split())


def read_sidecar(
    raw_dir: Path, source: str, root: Path | None = None
) -> tuple[str | None, str | None, str | None]:
    """(caption, problem, sidecar path) for ``raw_dir/<source with .txt suffix>``.

    No file: (None, None, path). A file that escapes ``raw_dir`` (``..``, absolute, or a symlink
    pointing outside), is not a regular file, is not UTF-8, is empty or too long is a problem and is
    not used. ``root``: ``raw_dir.resolve()``, when the caller has it already (one call per photo).
    """
    rel = _safe_relative_source(source)
    if rel is None:
        return None, f"source path {source!r} is not a safe relative path; sidecar not looked up", None
    rel_txt = rel.with_suffix(".txt")
    shown = rel_txt.as_posix()
    root = raw_dir.resolve() if root is None else root
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
    text = clean_caption_text(text)
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
        est = rec.get("colour_estimate")
        if est is not None and not (
            isinstance(est, dict)
            and isinstance(est.get("colour"), str)
            and isinstance(est.get("details"), dict)
        ):
            raise CaptionsFormatError(
                f"{where} ({rec['image_file']}): colour_estimate must be {{'colour': name, 'details': {{...}}}}"
            )
    return records


@dataclass
class MetadataCaptions:
    """Captions from ``raw_dir/metadata.jsonl``: by photo path (relative to raw_dir, posix)."""

    path: Path | None = None
    # rel path -> (caption or None, line, problem or None); a problem line's caption is not used.
    by_source: dict[str, tuple[str | None, int, str | None]] = field(default_factory=dict)

    def get(self, source: str) -> tuple[str | None, int, str | None] | None:
        return self.by_source.get(source)


def _metadata_line(path: Path, lineno: int, raw: bytes) -> tuple[str, str] | None:
    """(file_name as a posix path, text) of one metadata.jsonl line; None for a blank line."""
    where = f"{path}, line {lineno}"
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise CaptionsFormatError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise CaptionsFormatError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise CaptionsFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    name, text = obj.get("file_name"), obj.get("text")
    rel = _safe_relative_source(name)
    if rel is None:
        raise CaptionsFormatError(
            f"{where}: file_name {name!r} must be a relative path inside the raw folder (imagefolder layout)"
        )
    if not isinstance(text, str):
        raise CaptionsFormatError(f"{where}: 'text' must be a string (the caption), got {text!r}")
    return rel.as_posix(), text


def load_metadata_jsonl(raw_dir: Path) -> MetadataCaptions:
    """Parse ``raw_dir/metadata.jsonl`` if there is one (an empty result otherwise).

    A line that is not a JSON object with a relative ``file_name`` and a string ``text``, or that
    repeats a ``file_name``, is an error naming the file and line: the file is machine-written, so a
    bad line means the whole file cannot be trusted. An empty or over-long caption is a problem and
    that photo falls through to its styles.csv row.
    """
    path = Path(raw_dir) / METADATA_JSONL
    if not path.is_file():
        return MetadataCaptions()
    result = MetadataCaptions(path=path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            parsed = _metadata_line(path, lineno, raw)
            if parsed is None:
                continue
            name, text = parsed
            if name in result.by_source:
                first = result.by_source[name][1]
                raise CaptionsFormatError(
                    f"{path}, line {lineno}: duplicate file_name {name!r} (first on line {first})"
                )
            text = clean_caption_text(text)
            problem = None
            if not text:
                problem = f"{METADATA_JSONL} line {lineno}: empty text for {name}; ignored"
            elif len(text) > MAX_CAPTION_CHARS:
                problem = (
                    f"{METADATA_JSONL} line {lineno}: text for {name} has {len(text)} characters "
                    f"(max {MAX_CAPTION_CHARS}); ignored"
                )
            result.by_source[name] = (None if problem else text, lineno, problem)
    return result


# ----------------------------------------------------------------------------------------------
# Building captions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionSettings:
    """The config's caption settings (part of every caption's key)."""

    template: str
    default_type: str
    default_characteristics: str


@dataclass(frozen=True)
class PhotoSources:
    """What the caption sources say about one photo."""

    sidecar: str | None = None
    sidecar_path: str | None = None
    sidecar_problem: str | None = None
    metadata: str | None = None
    metadata_line: int | None = None
    metadata_problem: str | None = None
    row: StyleRow | None = None


def gather_sources(
    rec: dict[str, Any], raw_root: Path, styles: StylesTable, metadata: MetadataCaptions
) -> PhotoSources:
    """Read the photo's sidecar and look up its metadata.jsonl line and styles.csv row."""
    source = str(rec.get("source", ""))
    text, problem, path = read_sidecar(raw_root, source, root=raw_root)
    meta_text, meta_line, meta_problem = metadata.get(source) or (None, None, None)
    return PhotoSources(
        text, path, problem, meta_text, meta_line, meta_problem, styles.get(str(rec.get("id", "")))
    )


def caption_key(rec: dict[str, Any], src: PhotoSources, settings: CaptionSettings) -> str:
    """Hash of everything a photo's caption entry is made from (see the module doc)."""
    payload = {
        "vocabulary": VOCABULARY_VERSION,
        "record": rec,
        "sources": dataclasses.asdict(src),
        "settings": dataclasses.asdict(settings),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _not_footwear(row: StyleRow) -> bool:
    return row.article_type.lower().strip() in NON_SHOE_ARTICLES or bool(
        row.master_category and row.master_category.lower() != "footwear"
    )


def photo_problems(image_file: str, src: PhotoSources) -> list[dict[str, Any]]:
    """The problems the sources show for one photo (reported on every run, reused entry or not)."""
    problems: list[dict[str, Any]] = []
    if src.sidecar_problem:
        problems.append(
            {
                "kind": "bad_sidecar",
                "image_file": image_file,
                "sidecar": src.sidecar_path,
                "problem": src.sidecar_problem,
            }
        )
    if src.metadata_problem:
        problems.append(
            {
                "kind": "bad_metadata",
                "line": src.metadata_line,
                "image_file": image_file,
                "problem": src.metadata_problem,
            }
        )
    row = src.row
    if row is not None and _not_footwear(row):
        problems.append(
            {
                "kind": "not_footwear",
                "line": row.line,
                "id": row.id,
                "image_file": image_file,
                "problem": f"styles row is {row.master_category}/{row.article_type}, not a shoe; its type is not used",
            }
        )
    return problems


def _styles_words(
    row: StyleRow, default_type: str, meta: dict[str, Any]
) -> tuple[str, str | None, str | None, list[str]]:
    """(type phrase, colour word, material, features) from a styles row; records their origin in meta."""
    if _not_footwear(row):
        type_phrase, type_known = default_type, False
    else:
        type_phrase, type_known = type_from_style(row, default_type)
    colour = colour_word(row.base_colour)
    material = material_from_name(row.product_display_name)
    meta["colour_source"] = "styles" if colour else None
    meta["type_source"] = "styles" if type_known else "default"
    meta["styles_line"] = row.line
    if material:
        meta["material"] = material
    return type_phrase, colour, material, features_from_name(row.product_display_name)


def _pixel_colour(rec: dict[str, Any], cleaned_dir: Path) -> tuple[str, dict[str, Any]]:
    """The colour the cleaning stage measured; read from the PNG only for a manifest without it."""
    est = rec.get("colour_estimate")
    if est is not None:
        return est["colour"], dict(est["details"])
    path = cleaned_dir / "images" / rec["image_file"]
    try:
        with Image.open(path) as img:
            return estimate_colour(img)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"cleaned image {path} listed in the manifest is missing") from exc


def caption_entry(
    rec: dict[str, Any], src: PhotoSources, settings: CaptionSettings, cleaned_dir: Path
) -> dict[str, Any]:
    """One captions.json entry: sidecar > metadata.jsonl > styles row > colour from the pixels."""
    meta: dict[str, Any] = {"original_size": list(rec["original_size"]), "processed": True}
    colour: str | None = None
    type_word: str | None = None
    if src.row is not None:
        type_word, colour, material, features = _styles_words(src.row, settings.default_type, meta)
    if src.sidecar is not None:
        caption = src.sidecar
        meta.update({"caption_source": "sidecar", "sidecar": src.sidecar_path})
    elif src.metadata is not None:
        caption = src.metadata
        meta.update({"caption_source": "metadata", "metadata_line": src.metadata_line})
    elif src.row is not None:
        if colour is None:
            colour, details = _pixel_colour(rec, cleaned_dir)
            meta.update({"colour_source": "pixels", "colour_estimate": details})
        characteristics = ", ".join(features) if features else settings.default_characteristics
        full_type = f"{material} {type_word}" if material else type_word
        caption = render_caption(settings.template, colour, full_type, characteristics)
        meta.update({"caption_source": "styles", "characteristics": characteristics})
    else:
        colour, details = _pixel_colour(rec, cleaned_dir)
        type_word = settings.default_type
        caption = render_caption(settings.template, colour, type_word, settings.default_characteristics)
        meta.update(
            {
                "caption_source": "estimated",
                "colour_source": "pixels",
                "type_source": "default",
                "colour_estimate": details,
                "characteristics": settings.default_characteristics,
            }
        )
    meta["colour"] = colour
    meta["type"] = type_word
    for key in ("id", "source", "source_sha256", "near_duplicate_of"):
        if key in rec:
            meta[key] = rec[key]
    return {"image_file": rec["image_file"], "caption": caption, "metadata": meta}


def _sorted_counts(counter: Counter[str]) -> dict[str, int]:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _unmatched_problems(
    styles: StylesTable, matched_ids: set[str], metadata: MetadataCaptions, matched_sources: set[str]
) -> list[dict[str, Any]]:
    """Styles rows and metadata.jsonl lines that name no kept image (e.g. a photo cleaning rejected)."""
    problems = [
        {"kind": "unmatched", "line": row.line, "id": row.id, "problem": "styles row matches no kept image"}
        for row in styles.rows.values()
        if row.id not in matched_ids
    ]
    problems += [
        {
            "kind": "unmatched_metadata",
            "line": line,
            "problem": f"{METADATA_JSONL} line {line}: {name} is not a kept image",
        }
        for name, (_, line, _) in metadata.by_source.items()
        if name not in matched_sources
    ]
    return problems


def build_captions(
    cleaned_dir: Path,
    raw_dir: Path,
    styles: StylesTable,
    template: str,
    default_type: str,
    default_characteristics: str,
    previous: Path | None = None,
) -> CaptionsResult:
    """Caption every record of ``cleaned_dir/manifest.json`` (sidecar > metadata.jsonl > styles > pixels).

    ``previous``: the captions.json an earlier run wrote with :func:`write_captions`; its entries
    whose key is unchanged are reused (``reused_count``), every other photo is captioned
    (``captioned``). ``problems`` holds the styles problems, one ``unmatched`` entry per styles row
    that names no kept image, ``unmatched_metadata`` per such metadata.jsonl line, and per photo
    ``not_footwear``, ``bad_sidecar`` and ``bad_metadata`` entries. Entries are sorted by ``image_file``.
    """
    cleaned_dir, raw_dir = Path(cleaned_dir), Path(raw_dir)
    settings = CaptionSettings(template, default_type, default_characteristics)
    metadata = load_metadata_jsonl(raw_dir)
    old = load_previous_captions(previous)
    raw_root = raw_dir.resolve()
    result = CaptionsResult([], {}, list(styles.problems), {}, {}, {}, notes=list(styles.notes))
    problem_counts: Counter[str] = Counter(p["kind"] for p in styles.problems)
    # Problems beyond the listing cap are still counted.
    problem_counts["truncated_styles_problems"] = styles.problem_count - len(styles.problems)
    # Every source is counted (0 too), metadata.jsonl only when the raw folder has one.
    sources: Counter[str] = Counter({s: 0 for s in CAPTION_SOURCES if s != "metadata" or metadata.path})
    colours: Counter[str] = Counter()
    types: Counter[str] = Counter()
    matched_ids: set[str] = set()
    matched_sources: set[str] = set()

    # Last first, popped: each manifest record is freed as soon as its entry exists (memory stays flat).
    records = sorted(read_manifest(cleaned_dir), key=lambda r: r["image_file"], reverse=True)
    while records:
        rec = records.pop()
        image_file = rec["image_file"]
        src = gather_sources(rec, raw_root, styles, metadata)
        key = caption_key(rec, src, settings)
        result.problems += photo_problems(image_file, src)
        prev_key, prev_entry = old.get(image_file, (None, None))
        if prev_key == key and prev_entry is not None:
            entry = prev_entry
            result.reused_count += 1
        else:
            entry = caption_entry(rec, src, settings, cleaned_dir)
            result.captioned.append(image_file)
        result.entries.append(entry)
        result.keys[image_file] = key
        if src.row is not None:
            matched_ids.add(src.row.id)
        if metadata.get(str(rec.get("source", ""))) is not None:
            matched_sources.add(str(rec["source"]))
        meta = entry["metadata"]
        sources[meta["caption_source"]] += 1
        colours[meta.get("colour") or "unknown"] += 1
        types[meta.get("type") or "unknown"] += 1

    result.problems += _unmatched_problems(styles, matched_ids, metadata, matched_sources)
    problem_counts.update(p["kind"] for p in result.problems[len(styles.problems) :])
    result.source_counts = dict(sources)
    result.problem_counts = {k: v for k, v in sorted(problem_counts.items()) if v}
    result.colour_counts, result.type_counts = _sorted_counts(colours), _sorted_counts(types)
    result.styles_rows, result.styles_matched = len(styles), len(matched_ids)
    return result


# ----------------------------------------------------------------------------------------------
# Reusing the previous run's entries
# ----------------------------------------------------------------------------------------------


def cache_path(captions_json: Path) -> Path:
    """Where :func:`write_captions` keeps each entry's key, next to captions.json."""
    return Path(captions_json).with_name(f".{Path(captions_json).stem}_cache.json")


def load_previous_captions(captions_json: Path | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """image_file -> (key, entry) from an earlier :func:`write_captions`; empty when there is nothing
    trustworthy to reuse (no cache, another cache version, or captions.json changed since)."""
    if captions_json is None:
        return {}
    try:
        cache = json.loads(cache_path(captions_json).read_text(encoding="utf-8"))
        data = Path(captions_json).read_bytes()
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION:
        return {}
    if hashlib.sha256(data).hexdigest() != cache.get("captions_sha256"):
        return {}  # edited or replaced by hand since: caption everything again
    try:
        entries = validate_caption_entries(json.loads(data), str(captions_json))
    except ValueError:  # also CaptionsFormatError and invalid JSON
        return {}
    keys = cache.get("keys") if isinstance(cache.get("keys"), dict) else {}
    return {
        e["image_file"]: (keys[e["image_file"]], e)
        for e in entries
        if isinstance(keys.get(e["image_file"]), str)
    }


def write_captions(result: CaptionsResult, path: Path) -> Path:
    """captions.json (see :func:`write_captions_json`) plus the keys that let the next run reuse entries."""
    path = write_captions_json(result.entries, path)
    doc = {"version": CACHE_VERSION, "captions_sha256": file_sha256(path), "keys": result.keys}
    atomic_write_json(cache_path(path), doc, indent=None, sort_keys=True)
    return path


# ----------------------------------------------------------------------------------------------
# captions.json
# ----------------------------------------------------------------------------------------------


def validate_caption_entries(entries: Any, source: str = "captions") -> list[dict[str, Any]]:
    """Check the recipe's captions.json format; raise CaptionsFormatError naming ``source`` and the entry."""
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
    # Fixed key order (the recipe's keys first, extras sorted) so the file is byte-identical across runs.
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
