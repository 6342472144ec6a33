"""cleaned_images: every raw photo decoded safely into a 512×512 RGB PNG, or rejected with a reason."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg
import pandas as pd

from shoe_lora_pipeline.assets._category import category_config
from shoe_lora_pipeline.assets._metadata import config_metadata, md_table
from shoe_lora_pipeline.core.cleaning import CleaningParams, CleaningReport, clean_images
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.layout import Layout
from shoe_lora_pipeline.resources import PipelineConfigResource


@dg.asset(
    group_name="dataset",
    deps=["raw_images"],
    kinds={"pillow"},
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            "cleaned_images_are_square_rgb_png",
            asset="cleaned_images",
            description="Every cleaned image is a resolution×resolution RGB PNG.",
        ),
        dg.AssetCheckSpec(
            "valid_ratio_above_minimum",
            asset="cleaned_images",
            description="valid / raw image ratio is at least dataset.min_valid_ratio.",
        ),
    ],
    description="512px white-padded RGB PNGs + discard report (empty, corrupt, too small, extreme aspect, "
    "decompression bombs, duplicates). Incremental: only new or changed photos are decoded.",
)
def cleaned_images(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource
) -> dg.MaterializeResult:
    cfg, layout = category_config(context, pipeline_config)
    manifest = pd.read_csv(layout.raw_manifest, dtype={"rel_path": str, "sha256": str})
    params = CleaningParams.from_config(cfg.dataset.cleaning, cfg.dataset.resolution)
    report = clean_images(
        manifest,
        layout.cleaned_dir,
        params,
        near_duplicate_distance=cfg.dataset.cleaning.near_duplicate_distance,
        workers=cfg.dataset.cleaning.workers,
    )
    for reject in report.rejects:
        context.log.info(f"rejected {reject['source']}: {reject['reason']}")

    reasons = [{"reason": k, "count": v} for k, v in sorted(report.rejects_by_reason.items())]
    return dg.MaterializeResult(
        metadata={
            **config_metadata(cfg),
            "raw_count": report.raw_count,
            "valid_count": report.valid_count,
            "valid_pct": round(100.0 * report.valid_ratio, 2),
            "rejected_count": len(report.rejects),
            "rejects_by_reason": dg.MetadataValue.md(md_table(reasons, ["reason", "count"])),
            "rejects": dg.MetadataValue.md(md_table(report.rejects, ["source", "reason_code", "reason"])),
            "near_duplicates": report.near_duplicate_count,
            "processed_this_run": report.processed_count,
            "reused_from_cache": report.reused_count,
            "removed_outputs": report.removed_count,
            "total_output_mb": round(report.total_output_bytes / 1e6, 2),
            "seconds": round(report.seconds, 2),
            "images_dir": dg.MetadataValue.path(str(layout.cleaned_images_dir)),
            "discard_report": dg.MetadataValue.path(str(layout.cleaned_dir / "discard_report.csv")),
        },
        check_results=[cleaned_images_are_square_rgb_png(cfg), valid_ratio_above_minimum(cfg, report)],
    )


def cleaned_images_are_square_rgb_png(cfg: PipelineConfig) -> dg.AssetCheckResult:
    from PIL import Image

    res = cfg.dataset.resolution
    bad = []
    files = sorted(Layout.of(cfg).cleaned_images_dir.glob("*"))
    for path in files:
        try:
            with Image.open(path) as im:
                if im.format != "PNG" or im.mode != "RGB" or im.size != (res, res):
                    bad.append(
                        {"file": path.name, "found": f"{im.format} {im.mode} {im.size[0]}×{im.size[1]}"}
                    )
        except OSError as exc:
            bad.append({"file": path.name, "found": f"unreadable: {exc}"})
    return dg.AssetCheckResult(
        check_name="cleaned_images_are_square_rgb_png",
        passed=not bad and bool(files),
        metadata={
            "checked": len(files),
            "expected": f"PNG RGB {res}×{res}",
            "violations": dg.MetadataValue.md(md_table(bad[:50], ["file", "found"])),
        },
    )


def valid_ratio_above_minimum(cfg: PipelineConfig, report: CleaningReport) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="valid_ratio_above_minimum",
        passed=report.raw_count > 0 and report.valid_ratio >= cfg.dataset.min_valid_ratio,
        metadata={
            "valid": report.valid_count,
            "raw": report.raw_count,
            "ratio": round(report.valid_ratio, 4),
            "minimum": cfg.dataset.min_valid_ratio,
        },
    )
