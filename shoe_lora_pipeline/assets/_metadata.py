"""Small helpers that turn core results into Dagster metadata (tables, thumbnails, config facts)."""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from shoe_lora_pipeline.core import markdown
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.display import display_value

if TYPE_CHECKING:
    from shoe_lora_pipeline.core.device import DeviceInfo

# A materialisation's metadata: Dagster's typed values or plain scalars (which Dagster wraps itself).
MetadataDict = dict[str, dg.MetadataValue | str | int | float | bool]


def _md_value(value: Any) -> Any:
    """A table cell as people read it: booleans as JSON writes them (true/false, as Dagster shows its own
    booleans, not Python's False), floats rounded (core.display)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return display_value(value)


def md_table(rows: Iterable[Mapping[str, Any]], columns: list[str], empty: str = "_none_") -> str:
    """A markdown table of ``rows`` (one mapping each); cells escaped by :func:`core.markdown.md_cell`, so a
    hostile file name cannot break the table."""
    rows = list(rows)
    if not rows:
        return empty
    return markdown.md_table(columns, [[_md_value(r.get(c, "")) for c in columns] for r in rows])


def rounded(metadata: MetadataDict) -> MetadataDict:
    """Plain float values rounded for display (core.display); the JSON files keep full precision."""
    return {k: display_value(v) for k, v in metadata.items()}


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


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, Any]:
    from shoe_lora_pipeline.core.provenance import git_info, package_versions

    return {"package_versions": package_versions(), "git": git_info()}


def dataset_manifest_hash(cfg: PipelineConfig) -> str | None:
    """Manifest hash of the category's last raw_images scan (None before the first one)."""
    from shoe_lora_pipeline.core.layout import Layout

    path = Layout.of(cfg).raw_manifest
    if not path.exists():
        return None
    import pandas as pd

    from shoe_lora_pipeline.core.manifest import manifest_hash

    return manifest_hash(pd.read_csv(path, dtype={"rel_path": str, "sha256": str}))


def base_model_metadata(identity: Mapping[str, str | None]) -> MetadataDict:
    """The base model's resolved identity, the same values provenance.json, ``shoe-lora audit`` and the
    evaluation report show (``core.models.base_model_identity``: e.g. revision ``tiny-sd-v2`` or the hub
    snapshot's commit), never the config's unresolved ``training.revision``."""
    return {
        "base_model": str(identity.get("base_model")),
        "base_model_revision": identity.get("revision") or "none",
        "base_model_fingerprint": identity.get("fingerprint") or "none",
    }


def config_metadata(
    cfg: PipelineConfig,
    device: DeviceInfo | None = None,
    base_model: Mapping[str, str | None] | None = None,
) -> MetadataDict:
    """What every materialisation records for an audit: the resolved config and its hash, the dataset
    manifest hash, package versions and git commit; and, only where the asset used them, the base model's
    resolved identity (``base_model``: a ``core.models`` identity) and the device (``device``: its type,
    ``device_details``: everything :class:`DeviceInfo` knows)."""
    env = _environment()
    meta: MetadataDict = {
        "category": cfg.dataset.name,
        "config_file": dg.MetadataValue.path(str(cfg.source_path)),
        "config_hash": cfg.config_hash()[:16],
        "resolved_config": dg.MetadataValue.json(cfg.model_dump(mode="json")),
        "package_versions": dg.MetadataValue.json(env["package_versions"]),
        "git_commit": str(env["git"].get("commit") or "none"),
    }
    if base_model is not None:
        meta.update(base_model_metadata(base_model))
    if device is not None:
        meta["device"] = device.type
        meta["device_details"] = dg.MetadataValue.json(device.as_metadata())
    digest = dataset_manifest_hash(cfg)
    if digest:
        meta["dataset_manifest_hash"] = digest
    return meta
