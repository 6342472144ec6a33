"""The Dagster code location: every stage of every product category, the jobs, schedule, sensor and
resources.

``defs`` is a ``@dg.definitions`` function, so importing this module reads no config file: Dagster
(``dg dev``, ``dg launch``, ``dg check defs``, which find it through ``[tool.dg]`` in pyproject.toml, and
``dagster dev -w workspace.yaml``) calls it when it loads the code location. Tests call :func:`build_definitions` with their own config.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from shoe_lora_pipeline.assets import (
    RENDER_STAGE_NAMES,
    STAGE_NAMES,
    STAGES,
    category_assets,
    render_assets,
)
from shoe_lora_pipeline.automation import build_automation, build_specs_sensor
from shoe_lora_pipeline.core.config import load_config
from shoe_lora_pipeline.core.evaluation.checks import check_descriptions
from shoe_lora_pipeline.resources import PipelineConfigResource, default_resources

__all__ = [
    "RENDER_STAGE_NAMES",
    "STAGES",
    "STAGE_NAMES",
    "build_definitions",
    "category_assets",
    "defs",
    "render_assets",
]


def build_definitions(config_path: str | Path | None = None) -> dg.Definitions:
    """Definitions for the categories of a config file (default: $SHOE_LORA_CONFIG or configs/demo.yaml).

    Raw folders are not required to exist here, so the UI loads and a run reports the missing folder.
    """
    cfg = load_config(config_path, check_paths=False)
    first, *others = cfg.category_names()
    # The checklist's descriptions state the configured thresholds (evaluation.thresholds).
    described = check_descriptions(cfg.evaluation.thresholds)
    assets = category_assets(first, check_descriptions=described) + [
        a for name in others for a in category_assets(name, primary=False, check_descriptions=described)
    ]
    assets += [
        a
        for name in cfg.category_names()
        if cfg.for_category(name).renders.specs_csv is not None
        for a in render_assets(
            name, primary=name == first, profiles=cfg.for_category(name).publish.resolved_profiles()
        )
    ]
    resources = default_resources()
    if config_path is not None:
        resources["pipeline_config"] = PipelineConfigResource(config_path=str(config_path))
    jobs, schedules, sensors = build_automation(cfg)
    specs_sensor = build_specs_sensor(cfg)
    if specs_sensor is not None:
        sensors.append(specs_sensor)
    return dg.Definitions(assets=assets, jobs=jobs, schedules=schedules, sensors=sensors, resources=resources)


@dg.definitions
def defs() -> dg.Definitions:
    """What Dagster loads: the categories of $SHOE_LORA_CONFIG (default configs/demo.yaml)."""
    return build_definitions()
