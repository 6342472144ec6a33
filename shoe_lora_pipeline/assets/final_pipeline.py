"""final_pipeline: the base model with the LoRA fused in, saved as a standalone diffusers pipeline."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import json

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config
from shoe_lora_pipeline.assets._metadata import config_metadata
from shoe_lora_pipeline.resources import BaseModelResource, PipelineConfigResource


@dg.asset(
    group_name="export",
    deps=["lora_weights"],
    kinds={"diffusers"},
    code_version="1",
    description="The base model's pipeline with the LoRA fused (save_pretrained, safetensors), of the base "
    "model's family: loads with StableDiffusionPipeline.from_pretrained(path) (SD1.5) or "
    "StableDiffusionXLPipeline.from_pretrained(path) (SDXL) and needs no LoRA at inference. ~2–4 GB on "
    "SD1.5 (~7 GB on SDXL), so it is written once per LoRA version.",
)
def final_pipeline(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource, base_model: BaseModelResource
) -> dg.MaterializeResult:
    # Imported here, not at module level: the data steps load this module too and must not pay for torch.
    from shoe_lora_pipeline.core.lora_io import fuse_lora_pipeline, read_provenance

    cfg, layout = category_config(context, pipeline_config)
    base_dir = base_model.folder(cfg)
    lora_prov = read_provenance(layout.lora_weights_dir)
    out = fuse_lora_pipeline(
        base_dir,
        layout.lora_weights_dir,
        layout.final_pipeline_dir,
        lora_scale=cfg.export.fuse_lora_scale,
        provenance=lora_prov.get("provenance"),
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    # The class that loads it, as saved in model_index.json (StableDiffusionXLPipeline for an SDXL base).
    pipeline_class = json.loads((out / "model_index.json").read_text())["_class_name"]
    return dg.MaterializeResult(
        metadata={
            **config_metadata(cfg, base_model=base_model.identity(cfg)),
            "final_pipeline_dir": dg.MetadataValue.path(str(out)),
            "size_mb": round(size / 1e6, 1),
            "lora_scale": cfg.export.fuse_lora_scale,
            "pipeline_class": pipeline_class,
        },
    )
