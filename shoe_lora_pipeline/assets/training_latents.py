"""training_latents: VAE latents and CLIP text embeddings of the train split, encoded once and cached."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config, device_for
from shoe_lora_pipeline.assets._metadata import config_metadata
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource


@dg.asset(
    group_name="training",
    deps=["dataset_splits"],
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    code_version="1",
    description="VAE latent_dist mean/std and CLIP text embeddings for every train image (and every val "
    "image, for the validation loss), as safetensors shards keyed by base model, image hash, caption and "
    "resolution: unchanged items are never re-encoded, and training no longer needs the VAE encoder or the "
    "text encoder in memory.",
)
def training_latents(
    context: dg.AssetExecutionContext,
    pipeline_config: PipelineConfigResource,
    device: DeviceResource,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    # Imported here, not at module level: the data steps load this module too and must not pay for torch.
    from shoe_lora_pipeline.core.latents import cache_latents

    cfg, layout = category_config(context, pipeline_config)
    device_info = device_for(context, device, cfg)
    if not cfg.training.cache_latents:
        context.log.info("training.cache_latents is false: lora_training encodes images on the fly")
        return dg.MaterializeResult(metadata={**config_metadata(cfg, device_info), "cache_latents": False})

    from shoe_lora_pipeline.core.latents import has_images  # torch: this step only

    components = base_model.load(cfg, device_info)
    encode = {
        "resolution": cfg.dataset.resolution,
        "batch_size": cfg.training.latent_encoding_batch_size,
        "device": device_info.torch_device,
        "dtype": device_info.weight_dtype,
    }
    report = cache_latents(components, layout.split_dir("train"), layout.latents_dir, **encode)
    val_items = 0
    if has_images(layout.split_dir("val")):
        val_items = cache_latents(components, layout.split_dir("val"), layout.val_latents_dir, **encode).total
    else:
        context.log.info("the val split is empty: training will report no validation loss")
    for note in report.notes:
        context.log.info(note)
    return dg.MaterializeResult(
        metadata={
            **config_metadata(cfg, device_info, components.identity),
            "cache_latents": True,
            "items": report.total,
            "val_items": val_items,
            "computed_this_run": report.computed,
            "reused": report.reused,
            "removed": report.removed,
            "latent_shape": str(report.latent_shape),
            "embedding_shape": str(report.embedding_shape),
            "scaling_factor": report.scaling_factor,
            "size_mb": round(report.bytes_on_disk / 1e6, 2),
            "seconds": round(report.seconds, 2),
            "cache_dir": dg.MetadataValue.path(str(report.cache_dir)),
        },
    )
