"""Small helpers that turn core results into Dagster metadata (tables, thumbnails, config facts)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from shoe_lora_pipeline.core.config import PipelineConfig


def md_table(rows: Iterable[Mapping[str, Any]], columns: list[str], empty: str = "_none_") -> str:
    """A markdown table; `|` inside values is escaped so a hostile file name cannot break the table."""
    rows = list(rows)
    if not rows:
        return empty

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def thumbnail_md(path: Path, caption: str, max_side: int = 384) -> str:
    """Inline a small PNG thumbnail (data URI) so the image shows in the Dagster UI; the event log keeps it,
    hence the small size."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    data = base64.b64encode(buf.getvalue()).decode()
    return f"![{caption}](data:image/png;base64,{data})"


def config_metadata(cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "config_file": dg.MetadataValue.path(str(cfg.source_path)),
        "config_hash": cfg.config_hash()[:16],
        "dataset": cfg.dataset.name,
    }
