"""Where the renders stages write (all of it under one ``renders/`` folder) and the records they share.

::

    renders/
      index.json                 the last product_renders run: sheet hash, LoRA, settings, SKUs in order
      rejected_specs.csv         the refused rows of the specs sheet and why
      candidates/<sku>/          NNN-<key>.png candidates + render.json (key, prompt, seeds, QA, rank)
      reviews.csv                sku, file, decision, note: edited by a reviewer, merged on every run
      approvals.json             what render_review approved (and why) for published_renders
      contact_sheet.html         the review page (opens from disk; images by relative path)
      published/<sku>/*.png      approved images with provenance in the PNG; published/manifest.csv
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_SCHEMA = "shoe_lora_pipeline/renders-index/v1"


class RendersStateError(RuntimeError):
    """A renders record is missing or unreadable; the message names the file and the stage to run."""


@dataclass(frozen=True)
class RenderPaths:
    root: Path

    @property
    def index_json(self) -> Path:
        return self.root / "index.json"

    @property
    def rejected_csv(self) -> Path:
        return self.root / "rejected_specs.csv"

    @property
    def candidates_dir(self) -> Path:
        return self.root / "candidates"

    def sku_dir(self, sku: str) -> Path:
        return self.candidates_dir / sku

    def render_json(self, sku: str) -> Path:
        return self.sku_dir(sku) / "render.json"

    @property
    def reviews_csv(self) -> Path:
        return self.root / "reviews.csv"

    @property
    def approvals_json(self) -> Path:
        return self.root / "approvals.json"

    @property
    def contact_sheet(self) -> Path:
        return self.root / "contact_sheet.html"

    @property
    def published_dir(self) -> Path:
        return self.root / "published"

    @property
    def manifest_csv(self) -> Path:
        return self.published_dir / "manifest.csv"


def read_json_record(path: Path, stage: str) -> dict[str, Any]:
    """A JSON object written by an earlier renders stage; a clear error naming ``stage`` otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RendersStateError(f"{path}: not found; materialize {stage} first") from None
    except (OSError, ValueError) as exc:
        raise RendersStateError(f"{path}: unreadable ({exc}); materialize {stage} again") from None
    if not isinstance(data, dict):
        raise RendersStateError(f"{path}: expected a JSON object; materialize {stage} again")
    return data


def read_index(paths: RenderPaths) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(index.json, the render.json of every SKU in it, in sheet order)."""
    index = read_json_record(paths.index_json, "product_renders")
    renders = [read_json_record(paths.render_json(s["sku"]), "product_renders") for s in index["skus"]]
    return index, renders
