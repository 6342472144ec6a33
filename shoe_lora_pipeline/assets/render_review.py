"""render_review: the contact sheet, the reviewer's reviews.csv and which candidates are approved."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config
from shoe_lora_pipeline.assets._metadata import md_table
from shoe_lora_pipeline.core.config import PipelineConfig
from shoe_lora_pipeline.core.renders import RenderPaths, review_renders
from shoe_lora_pipeline.core.studio import launch_command
from shoe_lora_pipeline.resources import PipelineConfigResource


@dg.asset(
    group_name="renders",
    deps=["product_renders"],
    kinds={"html"},
    code_version="1",
    description="contact_sheet.html (best candidates first, QA scores, prompt, seed) and reviews.csv "
    "(sku, file, decision, note, seed, image_sha256) for a reviewer to edit; a decision belongs to the "
    "image (sku, seed, pixel hash), so it survives re-runs and renames. Approves what reviews approve "
    "plus, with renders.auto_approve, the top `count` candidates no review rejects and no rejected image "
    "equals (QA-passing ones only with renders.require_qa_pass).",
)
def render_review(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource
) -> dg.MaterializeResult:
    cfg, layout = category_config(context, pipeline_config)
    command = publish_command(context, cfg)
    result = review_renders(
        RenderPaths(layout.renders_dir),
        auto_approve=cfg.renders.auto_approve,
        require_qa_pass=cfg.renders.require_qa_pass,
        run_id=context.run.run_id,
        publish_command=command,
    )
    for sku in result.skus_without_approval:
        context.log.warning(f"{sku}: no candidate approved (none passed QA, or all were rejected)")
    approved = [
        {"sku": sku, "file": a["file"], "by": a["source"], "rank": a["rank"], "qa_score": a["qa_score"]}
        for sku, items in result.approvals.items()
        for a in items
    ]
    return dg.MaterializeResult(
        metadata={
            "contact_sheet": dg.MetadataValue.path(str(result.contact_sheet)),
            "publish_command": command,
            "reviews_csv": dg.MetadataValue.path(str(result.reviews_csv)),
            "candidates": result.n_candidates,
            "approved_images": len(approved),
            "approved_by_review": result.n_approved_by_review,
            "rejected_by_review": result.n_rejected_by_review,
            "skus_without_approval": dg.MetadataValue.json(result.skus_without_approval),
            "auto_approve": cfg.renders.auto_approve,
            "require_qa_pass": cfg.renders.require_qa_pass,
            "approved": dg.MetadataValue.md(md_table(approved, ["sku", "file", "by", "rank", "qa_score"])),
        }
    )


def publish_command(context: dg.AssetExecutionContext, cfg: PipelineConfig) -> str:
    """The exact command that re-reads reviews.csv and publishes this category: ``dg launch`` of this
    asset and its published_renders, with this run's instance and config, from the project folder (the
    `dg` CLI finds the project through pyproject.toml's [tool.dg]); ``-m`` when the package is not run
    from a checkout. The review studio shows the same command when no Dagster webserver answers."""
    keys = [context.asset_key, dg.AssetKey([*context.asset_key.path[:-1], "published_renders"])]
    return launch_command([k.path for k in keys], cfg.source_path, context.instance.root_directory)
