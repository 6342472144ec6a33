"""Where the renders stages write (all of it under one ``renders/`` folder) and the records they share.

::

    renders/
      index.json                 the last product_renders run: sheet hash, LoRA, settings, SKUs in order
      rejected_specs.csv         the refused rows of the specs sheet and why
      candidates/<sku>/          NNN-<key>.png candidates + render.json (key, prompt, seeds, image sha256, QA, rank)
      reviews.csv                sku, file, decision, note, seed, image_sha256: edited by a reviewer, merged
                                 on every run; a decision belongs to the image (sku, seed, image_sha256)
      approvals.json             what render_review approved (and why) for published_renders
      contact_sheet.html         the review page (opens from disk; images by relative path)
      published/<sku>/*.png      approved images with provenance in the PNG; published/manifest.csv
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

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


def pixels_sha256(image: Image.Image) -> str:
    """sha256 of an image's RGB pixels and size: the identity of a candidate image (its PNG file also
    holds text chunks that name the run)."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def png_pixels_sha256(path: Path) -> str | None:
    """:func:`pixels_sha256` of a PNG file; None when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return pixels_sha256(im)
    except (OSError, UnidentifiedImageError):
        return None


def with_image_hashes(paths: RenderPaths, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``image_sha256`` on every candidate (a render.json written before candidates
    carried it gets it from the PNG)."""
    for c in record.get("candidates") or []:
        if isinstance(c, dict) and not c.get("image_sha256") and "file" in c:
            c["image_sha256"] = png_pixels_sha256(paths.sku_dir(record["sku"]) / c["file"])
    return record


def read_index(paths: RenderPaths) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(index.json, the render.json of every SKU in it, in sheet order)."""
    index = read_json_record(paths.index_json, "product_renders")
    renders = [
        with_image_hashes(paths, read_json_record(paths.render_json(s["sku"]), "product_renders"))
        for s in index["skus"]
    ]
    return index, renders
