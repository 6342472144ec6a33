"""published_renders: the approved renders with their provenance inside each PNG, and a manifest."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config
from shoe_lora_pipeline.assets._metadata import config_metadata, md_table, thumbnail_md
from shoe_lora_pipeline.core.display import short_hash
from shoe_lora_pipeline.core.renders import RenderPaths, publish_renders
from shoe_lora_pipeline.resources import PipelineConfigResource


@dg.asset(
    group_name="renders",
    deps=["render_review"],
    kinds={"png"},
    code_version="1",
    description="published/SKU/*.png: the approved candidates, each with the A1111 `parameters` text "
    "chunk and a JSON chunk (LoRA sha256, config hash, Dagster run ids, QA, the LoRA's provenance, which "
    "`shoe-lora audit` / `lineage` read), and published/manifest.csv (sku, file, sha256, prompt, seed, LoRA "
    "sha256, QA score). The folder mirrors the current approvals.",
)
def published_renders(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource
) -> dg.MaterializeResult:
    cfg, layout = category_config(context, pipeline_config)
    result = publish_renders(
        RenderPaths(layout.renders_dir),
        config_hash=cfg.config_hash(),
        run_id=context.run.run_id,
        log=context.log.warning,
    )
    # A narrow table (short hashes; the full ones are in manifest.csv, the LoRA's below) so that no column
    # is cut off in the asset page.
    rows = [
        {
            "file": r["file"],
            "qa_score": r["qa_score"],
            "qa_passed": r["qa_passed"],
            "sha256": short_hash(r["sha256"]),
        }
        for r in result.rows
    ]
    lora_hashes = sorted({r["lora_sha256"] for r in result.rows})
    metadata = {
        **config_metadata(cfg),
        "published_dir": dg.MetadataValue.path(str(result.published_dir)),
        "manifest": dg.MetadataValue.path(str(result.manifest)),
        "images": len(result.rows),
        "skus_published": len({r["sku"] for r in result.rows}),
        "skus_without_images": dg.MetadataValue.json(result.skus_without_images),
        "published": dg.MetadataValue.md(md_table(rows, ["file", "qa_score", "qa_passed", "sha256"])),
    }
    if len(lora_hashes) == 1:
        metadata["lora_sha256"] = lora_hashes[0]
    if result.rows:
        first = result.published_dir / result.rows[0]["file"]
        metadata["first_image"] = dg.MetadataValue.md(
            f"{result.rows[0]['sku']}: `{result.rows[0]['file']}`\n\n"
            + thumbnail_md(first, f"{result.rows[0]['sku']} {result.rows[0]['file']}", 256)
        )
    return dg.MaterializeResult(metadata=metadata)
