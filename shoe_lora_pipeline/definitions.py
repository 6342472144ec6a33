"""The Dagster code location: every stage of every product category, the jobs, schedule, sensor and
resources, assembled here."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from shoe_lora_pipeline.assets import (
    captions,
    cleaned_images,
    dataset_splits,
    evaluation_report,
    final_pipeline,
    lora_training,
    lora_weights,
    product_renders,
    published_renders,
    raw_images,
    render_review,
    training_latents,
)
from shoe_lora_pipeline.assets._stage import build_stage
from shoe_lora_pipeline.automation import build_automation, build_specs_sensor
from shoe_lora_pipeline.core.config import PipelineConfig, load_config
from shoe_lora_pipeline.resources import PipelineConfigResource, default_resources

# The stages in pipeline order: raw photos → dataset → training → export → evaluation.
STAGES = [
    raw_images.raw_images,
    cleaned_images.cleaned_images,
    captions.captions,
    dataset_splits.dataset_splits,
    training_latents.training_latents,
    lora_training.lora_training,
    lora_weights.lora_weights,
    final_pipeline.final_pipeline,
    evaluation_report.evaluation_report,
]
STAGE_NAMES = [fn.__name__ for fn in STAGES]
# Product renders, downstream of a category's LoRA; built for the categories that have renders.specs_csv.
RENDER_STAGES = [
    product_renders.product_renders,
    render_review.render_review,
    published_renders.published_renders,
]
RENDER_STAGE_NAMES = [fn.__name__ for fn in RENDER_STAGES]


def category_assets(
    category: str, stages: list[str] | None = None, primary: bool = True
) -> list[dg.AssetsDefinition]:
    """One category's chain of assets (all stages unless named); keys as in :mod:`assets._stage`."""
    return [build_stage(fn, category, primary) for fn in STAGES if stages is None or fn.__name__ in stages]


def render_assets(category: str, primary: bool = True) -> list[dg.AssetsDefinition]:
    """One category's renders group (product_renders → render_review → published_renders)."""
    return [build_stage(fn, category, primary) for fn in RENDER_STAGES]


def build_definitions(config_path: str | Path | None = None) -> dg.Definitions:
    """Definitions for the categories of a config file (default: $SHOE_LORA_CONFIG or configs/demo.yaml).

    Raw folders are not required to exist here, so the UI loads and a run reports the missing folder.
    """
    cfg: PipelineConfig = load_config(config_path, check_paths=False)
    first, *others = cfg.category_names()
    assets = category_assets(first) + [a for name in others for a in category_assets(name, primary=False)]
    assets += [
        a
        for name in cfg.category_names()
        if cfg.for_category(name).renders.specs_csv is not None
        for a in render_assets(name, primary=name == first)
    ]
    resources = default_resources()
    if config_path is not None:
        resources["pipeline_config"] = PipelineConfigResource(config_path=str(config_path))
    jobs, schedules, sensors = build_automation(cfg)
    specs_sensor = build_specs_sensor(cfg)
    if specs_sensor is not None:
        sensors.append(specs_sensor)
    return dg.Definitions(assets=assets, jobs=jobs, schedules=schedules, sensors=sensors, resources=resources)


defs = build_definitions()
