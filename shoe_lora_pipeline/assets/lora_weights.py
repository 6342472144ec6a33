"""lora_weights: the trained LoRA in PEFT, diffusers and kohya/A1111 formats, with provenance and a card."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation types.

import hashlib
import json

import dagster as dg

from shoe_lora_pipeline.assets._category import category_config
from shoe_lora_pipeline.assets._metadata import config_metadata, dataset_manifest_hash, md_table
from shoe_lora_pipeline.core.captions import read_captions_json
from shoe_lora_pipeline.core.provenance import collect_provenance
from shoe_lora_pipeline.resources import BaseModelResource, PipelineConfigResource


@dg.asset(
    group_name="export",
    deps=["lora_training"],
    kinds={"safetensors"},
    code_version="1",
    description="adapter_config.json + adapter_model.safetensors (PEFT), pytorch_lora_weights.safetensors "
    "(diffusers, alpha honoured), a kohya file named after the dataset (e.g. casual_shoes_lora.safetensors, "
    "for A1111/ComfyUI/Civitai) and a model card; "
    "every file carries the provenance shown by `shoe-lora audit`. Reproducible: the same checkpoint and "
    "config give byte-identical files (this run's id and time are only in provenance.json).",
)
def lora_weights(
    context: dg.AssetExecutionContext, pipeline_config: PipelineConfigResource, base_model: BaseModelResource
) -> dg.MaterializeResult:
    # Imported here, not at module level: the data steps load this module too and must not pay for torch.
    from shoe_lora_pipeline.core.lora_io import TrainingFacts, export_lora, select_checkpoint

    cfg, layout = category_config(context, pipeline_config)
    ckpt = select_checkpoint(layout.checkpoints_dir, cfg.export.checkpoint_step, layout.training_dir)
    context.log.info(f"exporting {ckpt.path.name}")

    train_captions = [e["caption"] for e in read_captions_json(layout.split_dir("train") / "captions.json")]
    provenance = collect_provenance(
        dagster_run_id=context.run.run_id,
        config=cfg,
        training_state=ckpt.state,
        dataset_manifest_hash=dataset_manifest_hash(cfg),
    )
    result = export_lora(
        ckpt.path,
        layout.lora_weights_dir,
        dataset_name=cfg.dataset.name,
        provenance=provenance,
        training=TrainingFacts.from_config(
            cfg, captions=train_captions, num_train_images=len(train_captions)
        ),
        base_model_dir=base_model.folder(cfg),
        training_output_dir=layout.training_dir,
    )
    for warning in result.warnings:
        context.log.warning(warning)

    files = [{"file": name, "sha256": digest[:16]} for name, digest in sorted(result.file_sha256.items())]
    # The exported bytes do not depend on the run (core/lora_io.py: reproducible exports), so a no-op
    # re-export keeps the data version and leaves final_pipeline and the renders up to date.
    content = hashlib.sha256(json.dumps(result.file_sha256, sort_keys=True).encode()).hexdigest()
    return dg.MaterializeResult(
        data_version=dg.DataVersion(content),
        metadata={
            **config_metadata(cfg, base_model=ckpt.state.get("base_model")),
            "checkpoint": ckpt.path.name,
            "step": result.step,
            "rank": result.rank,
            "alpha": result.alpha,
            "lora_weights_dir": dg.MetadataValue.path(str(result.out_dir)),
            "kohya_file": dg.MetadataValue.path(str(result.kohya_weights)),
            "model_card": dg.MetadataValue.path(str(result.model_card)),
            "files": dg.MetadataValue.md(md_table(files, ["file", "sha256"])),
            "provenance": dg.MetadataValue.json(result.provenance),
        },
    )
