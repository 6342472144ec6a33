"""lora_training: the LoRA training loop with checkpoints, exact resume, validation images and a log."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import dagster as dg

from shoe_lora_pipeline.assets._metadata import config_metadata, thumbnail_md
from shoe_lora_pipeline.assets._stage import category_of, stage
from shoe_lora_pipeline.core.layout import Layout
from shoe_lora_pipeline.resources import BaseModelResource, DeviceResource, PipelineConfigResource


@stage(
    group="training",
    deps=("training_latents",),
    kinds={"pytorch"},
    pool="gpu",
    description="Trains the LoRA (peft on the UNet's to_k/to_q/to_v/to_out.0). Checkpoints every "
    "checkpointing_steps, written atomically; re-materialising resumes from the newest compatible "
    "checkpoint mid-epoch, or skips when training is already complete.",
)
def lora_training(
    context: dg.AssetExecutionContext,
    pipeline_config: PipelineConfigResource,
    device: DeviceResource,
    base_model: BaseModelResource,
) -> dg.MaterializeResult:
    # Imported here, not at module level: the data steps load this module too and must not pay for torch.
    from shoe_lora_pipeline.core.training import dataset_fingerprint, train_lora

    cfg = pipeline_config.get(category_of(context))
    layout = Layout.of(cfg)
    device_info = device.resolve(cfg)
    context.log.info(f"device: {device_info.type} ({device_info.name}); {device_info.dtype_policy}")
    components = base_model.load(cfg, device_info)
    train_dir = layout.split_dir("train")

    def on_progress(p: dict) -> None:
        # One line every log_every_steps (no tqdm in the run log: it floods the UI).
        context.log.info(p["line"])

    def on_validation(v: dict) -> None:
        context.log.info(f"validation images for step {v['step']}: {v['grid_path']}")

    result = train_lora(
        cfg,
        components,
        device_info,
        train_dir=train_dir,
        latents_dir=layout.latents_dir if cfg.training.cache_latents else None,
        output_dir=layout.training_dir,
        dataset_fingerprint=dataset_fingerprint(train_dir),
        on_progress=on_progress,
        on_validation=on_validation,
    )
    context.log.info(result.resume_note)

    metadata = {
        **config_metadata(cfg, device_info),
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "global_step": result.global_step,
        "max_train_steps": result.max_train_steps,
        "steps_this_run": result.steps_this_run,
        "skipped_already_complete": result.skipped,
        "resumed_from_step": result.resumed_from if result.resumed_from is not None else -1,
        "resume_note": result.resume_note,
        "final_loss": result.final_loss,
        "smoothed_loss": result.smoothed_loss,
        "wall_time_s": round(result.wall_time_s, 1),
        "seconds_per_step": result.seconds_per_step,
        "images_per_second": result.images_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "device": dg.MetadataValue.json(device_info.as_metadata()),
        "checkpoint_dir": dg.MetadataValue.path(str(result.checkpoint_dir)),
        "training_log": dg.MetadataValue.path(str(result.log_path)),
    }
    if result.loss_curve_png:
        metadata["loss_curve"] = dg.MetadataValue.md(thumbnail_md(result.loss_curve_png, "loss curve", 480))
    if result.latest_grid:
        metadata["validation_grid"] = dg.MetadataValue.md(
            thumbnail_md(result.latest_grid, "validation grid", 480)
        )
        metadata["validation_grid_path"] = dg.MetadataValue.path(str(result.latest_grid))
    # Dagster's metadata floats must be real numbers; drop what a skipped run could not measure.
    return dg.MaterializeResult(metadata={k: v for k, v in metadata.items() if v is not None})
