"""raw_images: the folder of product photos, as a manifest. Never writes to raw_dir."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config
from shoe_lora_pipeline.assets._metadata import config_metadata, md_table
from shoe_lora_pipeline.core.fsutil import atomic_write_file
from shoe_lora_pipeline.core.manifest import manifest_hash, scan_raw_dir
from shoe_lora_pipeline.resources import PipelineConfigResource


@dg.asset(
    group_name="dataset",
    kinds={"pandas"},
    code_version="1",
    description="Manifest of the raw photo folder (path, size, sha256, format). Its data version is the "
    "manifest hash, so any added, changed or deleted photo makes everything downstream stale.",
)
def raw_images(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource
) -> dg.MaterializeResult:
    cfg, layout = category_config(context, pipeline_config)
    scan = scan_raw_dir(cfg.dataset.raw_dir)
    digest = manifest_hash(scan.manifest)

    out = layout.raw_manifest
    atomic_write_file(out, lambda tmp: scan.manifest.to_csv(tmp, index=False))
    for skipped in scan.skipped:
        context.log.warning(f"skipped {skipped['path']}: {skipped['reason']}")

    by_kind = scan.manifest["kind"].value_counts().to_dict() if len(scan.manifest) else {}
    by_format = scan.manifest["format"].value_counts().to_dict() if len(scan.manifest) else {}
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest),
        metadata={
            **config_metadata(cfg),
            "raw_dir": dg.MetadataValue.path(str(cfg.dataset.raw_dir)),
            "manifest": dg.MetadataValue.path(str(out)),
            "manifest_hash": digest,
            "num_files": len(scan.manifest),
            "num_image_candidates": int(by_kind.get("image", 0)),
            "total_bytes": int(scan.manifest["size_bytes"].sum()) if len(scan.manifest) else 0,
            "formats": dg.MetadataValue.json({str(k): int(v) for k, v in by_format.items()}),
            "skipped": dg.MetadataValue.md(md_table(scan.skipped, ["path", "reason"])),
            "num_skipped": len(scan.skipped),
        },
    )
