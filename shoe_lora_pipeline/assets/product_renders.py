"""product_renders: every row of the category's specs sheet rendered with its LoRA, QA-scored and ranked."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config, device_for
from shoe_lora_pipeline.assets._metadata import config_metadata, md_table, rounded, thumbnail_md
from shoe_lora_pipeline.core.config import ConfigError
from shoe_lora_pipeline.core.renders import (
    RenderPaths,
    RenderSettings,
    lora_source,
    pipeline_loader,
    read_specs,
    render_dtype,
    render_sheet,
    spec_rules,
)
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource


@dg.asset(
    group_name="renders",
    deps=["lora_weights", "final_pipeline"],
    kinds={"pytorch"},
    pool="gpu",
    code_version="1",
    description="Renders renders.specs_csv: count × candidates_per_image candidates per SKU from the fused "
    "pipeline (or base + LoRA), batched across SKUs, seeds from (sku, index), each scored with the product "
    "QA and ranked. Incremental: a SKU re-renders only when its row, the settings or the LoRA's weights "
    "change (re-exporting the same LoRA re-renders nothing). "
    "Refused rows are named in the log and rejected_specs.csv.",
)
def product_renders(
    context: dg.AssetExecutionContext,
    pipeline_config: PipelineConfigResource,
    device: DeviceResource,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    cfg, layout = category_config(context, pipeline_config)
    if cfg.renders.specs_csv is None:
        raise ConfigError(f"category {cfg.dataset.name!r} has no renders.specs_csv in {cfg.source_path}")
    sheet = read_specs(cfg.renders.specs_csv, **spec_rules(cfg))
    lora = lora_source(layout.lora_weights_dir, layout.final_pipeline_dir)
    if lora.fused_dir is None:
        context.log.warning(
            "final_pipeline was not fused from the current LoRA file: rendering with base + LoRA"
        )
    device_info = device_for(context, device, cfg)
    load = pipeline_loader(
        lora,
        lambda: base_model.folder(cfg),
        device_info.torch_device,
        render_dtype(device_info.type, cfg.renders.precision),
        sampler=cfg.renders.sampler,
        lora_scale=cfg.export.fuse_lora_scale,
        compile_unet=cfg.renders.compile,
    )
    result = render_sheet(
        sheet,
        layout.renders_dir,
        RenderSettings.from_config(cfg),
        lora,
        load,
        run_id=context.run.run_id,
        log=context.log.info,
        warn=context.log.warning,
    )

    refused = [{"line": r.line, "sku": r.sku, "problem": r.problem} for r in sheet.rejected]
    keys = json.dumps([[r["sku"], r["key"]] for r in result.records], ensure_ascii=False)
    metadata = {
        **config_metadata(cfg, device_info, base_model.identity(cfg)),
        "specs_csv": dg.MetadataValue.path(str(sheet.path)),
        "specs_sha256": sheet.sha256,
        "rows_accepted": len(sheet.rows),
        "rows_refused": len(sheet.rejected),
        "refused_rows": dg.MetadataValue.md(md_table(refused, ["line", "sku", "problem"])),
        "rejected_specs_csv": dg.MetadataValue.path(str(result.paths.rejected_csv)),
        "skus_rendered": len(result.rendered),
        "skus_unchanged": len(result.reused),
        "skus_removed": len(result.removed),
        "images_generated": result.stats.images,
        "candidates_passing_qa": result.n_passing,
        "lora_sha256": lora.lora_sha256,
        "lora_content_sha256": lora.content_sha256,  # what the renders are keyed on
        "pipeline": "final_pipeline" if lora.fused_dir else "base + LoRA",
        "speed_levers": ", ".join(result.levers) or "none (CPU/MPS)",
        "renders_dir": dg.MetadataValue.path(str(layout.renders_dir)),
    }
    if result.stats.images_per_s is not None:
        metadata["images_per_s"] = result.stats.images_per_s
        metadata["generation_s"] = round(result.stats.seconds, 1)
    if result.records:
        first = result.records[0]
        metadata["best_candidate"] = dg.MetadataValue.md(best_candidate_md(result.paths, first))
    return dg.MaterializeResult(
        data_version=dg.DataVersion(hashlib.sha256(keys.encode()).hexdigest()), metadata=rounded(metadata)
    )


def best_candidate_md(paths: RenderPaths, record: Mapping[str, Any]) -> str:
    """The first SKU's best candidate, with a caption saying which SKU and file it is (the image's alt text
    is not shown by the UI)."""
    best = record["candidates"][0]
    qa = best["qa"]
    caption = (
        f"**{record['sku']}**, best of {len(record['candidates'])}: `{record['sku']}/{best['file']}` "
        f"(QA score {qa['score']:.3f}, {'pass' if qa['passed'] else 'fail'})"
    )
    image = thumbnail_md(paths.sku_dir(record["sku"]) / best["file"], f"{record['sku']} {best['file']}", 256)
    return f"{caption}\n\n{image}"
